//! Pure parsing of `nft -j list table inet topoproxy` back into what it records.
//!
//! Read are the record sets (the per-(frontend, policy) service sets, and the destination sets
//! older versions wrote, see [`super::render::DESTINATIONS`]), the hairpin set (nothing else
//! says which destinations are node-local), the node addresses and the load-balancer firewall
//! sets (`lb-not-from-node` follows from the others). The vips set, chains and rules are
//! ignored: they follow from the record and are rewritten by every replace.
//! Unknown sets are ignored too, so an older agent can read a newer table's records.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde_json::Value;

use super::render::{
    service_stem, set_name, Hairpin, DESTINATIONS, HAIRPIN, LB_FIREWALL, LB_FROM_NODE,
    LB_SOURCES_STEMS, NODE_ADDRESSES, SERVICE_KINDS,
};
use super::{NftState, TABLE};
use crate::model::{IpFamily, Protocol};
use crate::table::{canonical, VsKey};

/// What is wrong with the JSON `nft` printed.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("not JSON")]
    Json(#[source] serde_json::Error),
    #[error("no top-level `nftables` array")]
    Shape,
    #[error("set {set}: element {element} is not {expected}")]
    Element {
        set: String,
        element: String,
        expected: &'static str,
    },
    #[error("virtual service {key:?} is in both set {first} and set {second}")]
    Duplicate {
        key: VsKey,
        first: String,
        second: String,
    },
}

/// What `nft` listed of the table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListedTable {
    /// The records; `destinations` only from an older version's table.
    pub state: NftState,
    /// The hairpin set's elements: the node-local (address, protocol, port) destinations.
    pub hairpins: BTreeSet<Hairpin>,
}

/// What a set read back holds.
enum Record {
    Service(crate::table::Frontend, crate::table::TrafficPolicy),
    Destination,
    Hairpin,
    NodeAddress,
    Firewall,
    Source(Protocol),
    FromNode,
}

fn record_for(name: &str) -> Option<(Record, IpFamily)> {
    for family in [IpFamily::V4, IpFamily::V6] {
        for (frontend, policy) in SERVICE_KINDS {
            if name == set_name(service_stem(frontend, policy), family) {
                return Some((Record::Service(frontend, policy), family));
            }
        }
        if name == set_name(DESTINATIONS, family) {
            return Some((Record::Destination, family));
        }
        if name == set_name(HAIRPIN, family) {
            return Some((Record::Hairpin, family));
        }
        for (stem, record) in [
            (NODE_ADDRESSES, Record::NodeAddress),
            (LB_FIREWALL, Record::Firewall),
            (LB_FROM_NODE, Record::FromNode),
        ] {
            if name == set_name(stem, family) {
                return Some((record, family));
            }
        }
        for (protocol, stem) in LB_SOURCES_STEMS {
            if name == set_name(stem, family) {
                return Some((Record::Source(protocol), family));
            }
        }
    }
    None
}

/// Rebuilds the records and hairpins from the JSON of `nft -j list table inet topoproxy`.
pub fn parse_table(json: &str) -> Result<ListedTable, ParseError> {
    let root: Value = serde_json::from_str(json).map_err(ParseError::Json)?;
    let items = root
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or(ParseError::Shape)?;
    let mut listed = ListedTable::default();
    // Which set each service came from, to report a key recorded twice.
    let mut origin = std::collections::BTreeMap::new();
    for (name, record, family, elements) in items.iter().filter_map(our_set) {
        for element in elements {
            if let Record::NodeAddress = record {
                let address = element_value(element).and_then(|value| address(value, family));
                let address = address.ok_or_else(|| bad(name, element, "an address"))?;
                listed.state.node_addresses.insert(address);
                continue;
            }
            read_element(&mut listed, &mut origin, (name, &record, family), element)?;
        }
    }
    normalise_source_ranges(&mut listed);
    Ok(listed)
}

/// A set of topoproxy's table that records something: its name, what it records, the
/// family of its addresses and its elements.
fn our_set(item: &Value) -> Option<(&str, Record, IpFamily, &[Value])> {
    let set = item.get("set")?;
    if set.get("family").and_then(Value::as_str) != Some("inet")
        || set.get("table").and_then(Value::as_str) != Some(TABLE)
    {
        return None;
    }
    let name = set.get("name").and_then(Value::as_str)?;
    let (record, family) = record_for(name)?;
    let elements = set
        .get("elem")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    Some((name, record, family, elements))
}

/// One element of a recording set (but the node addresses'), into the listed state.
fn read_element(
    listed: &mut ListedTable,
    origin: &mut std::collections::BTreeMap<VsKey, String>,
    (name, record, family): (&str, &Record, IpFamily),
    element: &Value,
) -> Result<(), ParseError> {
    let fields = concat_fields(element).ok_or_else(|| bad(name, element, "a concat"))?;
    match record {
        Record::NodeAddress => {}
        Record::Firewall => {
            let key = service_key(name, element, family, fields)?;
            listed.state.source_ranges.entry(key).or_default();
        }
        Record::Source(protocol) => {
            let [addr, port, source] = fields else {
                return Err(bad(name, element, "addr . port . network"));
            };
            let addr = address(addr, family).ok_or_else(|| bad(name, element, "an address"))?;
            let port = port_of(port).ok_or_else(|| bad(name, element, "a port"))?;
            let network = network(source, family).ok_or_else(|| bad(name, element, "a network"))?;
            let key = VsKey::new(*protocol, addr, port);
            let ranges = listed.state.source_ranges.entry(key).or_default();
            ranges.allowed.push(network);
        }
        Record::FromNode => {
            let [addr, proto, port, source] = fields else {
                return Err(bad(name, element, "addr . proto . port . addr"));
            };
            let key = vs_key(name, element, family, [addr, proto, port])?;
            if address(source, family) != Some(key.address) {
                return Err(bad(name, element, "the same address twice"));
            }
            listed.state.source_ranges.entry(key).or_default().from_node = true;
        }
        Record::Service(frontend, policy) => {
            let key = service_key(name, element, family, fields)?;
            if let Some(first) = origin.insert(key, name.to_string()) {
                return Err(ParseError::Duplicate {
                    key,
                    first,
                    second: name.to_string(),
                });
            }
            listed.state.services.insert(key, (*frontend, *policy));
        }
        Record::Destination => {
            let [vip, proto, vport, dest, dport] = fields else {
                return Err(bad(name, element, "vip . proto . port . dest . port"));
            };
            let key = vs_key(name, element, family, [vip, proto, vport])?;
            let dest = address(dest, family).ok_or_else(|| bad(name, element, "an address"))?;
            let dport = port_of(dport).ok_or_else(|| bad(name, element, "a port"))?;
            listed.state.destinations.insert((key, dest, dport));
        }
        Record::Hairpin => {
            let [dest, proto, port, source] = fields else {
                return Err(bad(name, element, "dest . proto . port . dest"));
            };
            let key = vs_key(name, element, family, [dest, proto, port])?;
            if address(source, family) != Some(key.address) {
                return Err(bad(name, element, "the same address twice"));
            }
            listed
                .hairpins
                .insert((key.address, key.protocol, key.port));
        }
    }
    Ok(())
}

/// Ranges come back in set order; the planner's are sorted, deduplicated. A key that lost its
/// firewall record but kept stray elements holds no firewall.
fn normalise_source_ranges(listed: &mut ListedTable) {
    let keys: BTreeSet<VsKey> = listed.state.source_ranges.keys().copied().collect();
    for key in keys {
        if let Some(ranges) = listed.state.source_ranges.get_mut(&key) {
            ranges.allowed.sort();
            ranges.allowed.dedup();
            if ranges.allowed.is_empty() {
                listed.state.source_ranges.remove(&key);
            }
        }
    }
}

/// An `addr . proto . port` element's service.
fn service_key(
    set: &str,
    element: &Value,
    family: IpFamily,
    fields: &[Value],
) -> Result<VsKey, ParseError> {
    let [addr, proto, port] = fields else {
        return Err(bad(set, element, "addr . proto . port"));
    };
    vs_key(set, element, family, [addr, proto, port])
}

fn vs_key(
    set: &str,
    element: &Value,
    family: IpFamily,
    [addr, proto, port]: [&Value; 3],
) -> Result<VsKey, ParseError> {
    Ok(VsKey::new(
        protocol(proto).ok_or_else(|| bad(set, element, "a protocol"))?,
        address(addr, family).ok_or_else(|| bad(set, element, "an address"))?,
        port_of(port).ok_or_else(|| bad(set, element, "a port"))?,
    ))
}

/// A single-field element: the value itself, or wrapped as `{"elem": {"val": ...}}`.
fn element_value(element: &Value) -> Option<&Value> {
    Some(
        element
            .get("elem")
            .and_then(|elem| elem.get("val"))
            .unwrap_or(element),
    )
}

/// A network in an interval set: nft prints a prefix as `{"prefix": {"addr", "len"}}` and a
/// full-length one as the bare address; text `addr/len` is read too.
fn network(value: &Value, family: IpFamily) -> Option<IpNetwork> {
    let (addr, len) = if let Some(prefix) = value.get("prefix") {
        let len = u8::try_from(prefix.get("len")?.as_u64()?).ok()?;
        (address(prefix.get("addr")?, family)?, len)
    } else if let Some([first, last]) = value
        .get("range")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
    {
        let (first, last) = (address(first, family)?, address(last, family)?);
        (first, prefix_of_range(first, last)?)
    } else {
        let text = value.as_str()?;
        match text.split_once('/') {
            Some((addr, len)) => {
                let addr: IpAddr = addr.parse().ok()?;
                (IpFamily::of(&addr) == family).then_some(())?;
                (addr, len.parse().ok()?)
            }
            None => {
                let addr = address(value, family)?;
                (addr, if addr.is_ipv4() { 32 } else { 128 })
            }
        }
    };
    IpNetwork::new(addr, len).ok().map(canonical)
}

/// The prefix length of the range `first..=last` when it is exactly one prefix.
fn prefix_of_range(first: IpAddr, last: IpAddr) -> Option<u8> {
    let (first, last, bits) = match (first, last) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u128::from(u32::from(a)), u128::from(u32::from(b)), 32),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
        _ => return None,
    };
    let span = last.checked_sub(first)?.checked_add(1).unwrap_or(0);
    // A whole /0 of IPv6 overflows to 0.
    let host_bits = if span == 0 {
        128
    } else {
        span.trailing_zeros()
    };
    let aligned = span == 0 || (span.is_power_of_two() && first % span == 0);
    (aligned && host_bits <= bits).then(|| (bits - host_bits) as u8)
}

fn bad(set: &str, element: &Value, expected: &'static str) -> ParseError {
    ParseError::Element {
        set: set.to_string(),
        element: element.to_string(),
        expected,
    }
}

/// The fields of a concatenated element. Elements with flags, timeouts or comments are
/// wrapped as `{"elem": {"val": ...}}`.
fn concat_fields(element: &Value) -> Option<&[Value]> {
    let element = element
        .get("elem")
        .and_then(|elem| elem.get("val"))
        .unwrap_or(element);
    element
        .get("concat")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
}

fn address(value: &Value, family: IpFamily) -> Option<IpAddr> {
    let address: IpAddr = value.as_str()?.parse().ok()?;
    (IpFamily::of(&address) == family).then_some(address)
}

/// nft prints a protocol by name when `/etc/protocols` knows it, else by number.
fn protocol(value: &Value) -> Option<Protocol> {
    let number = match value {
        Value::Number(n) => u8::try_from(n.as_u64()?).ok()?,
        Value::String(s) => match s.as_str() {
            "tcp" => 6,
            "udp" => 17,
            "sctp" => 132,
            other => other.parse().ok()?,
        },
        _ => return None,
    };
    [Protocol::Tcp, Protocol::Udp, Protocol::Sctp]
        .into_iter()
        .find(|p| p.number() == number)
}

fn port_of(value: &Value) -> Option<u16> {
    match value {
        Value::Number(n) => u16::try_from(n.as_u64()?).ok(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::ipvs::nft::render::tests::{arb_state, small_state};
    use crate::dataplane::ipvs::nft::render::{hairpins, set_elements};
    use crate::table::{Frontend, TrafficPolicy};
    use proptest::prelude::*;

    /// `nft -j list table inet topoproxy` (nft 1.0.6, kernel 6.18) after loading
    /// `testdata/small.nft`, the rendering of `small_state()`.
    const SMALL_JSON: &str = include_str!("testdata/small.json");

    #[test]
    fn reads_back_what_real_nft_listed() {
        // An older version's table: it still recorded the destinations in sets of their own.
        let listed = parse_table(SMALL_JSON).expect("parse");
        let state = small_state();
        assert_eq!(listed.hairpins, hairpins_of(&state));
        assert_eq!(listed.state, state);
    }

    /// JSON shaped like nft's for a state's sets: addresses as strings, protocols by name
    /// or number, ports as numbers.
    fn nft_like_json(state: &NftState, numeric_protocols: bool) -> String {
        let sets: Vec<Value> = set_elements(state)
            .into_iter()
            .map(|(name, elements)| {
                // The per-protocol source sets carry no protocol field.
                let named_protocols = !numeric_protocols && !name.starts_with("lb-sources");
                let elem: Vec<Value> = elements
                    .iter()
                    .map(|element| {
                        let fields: Vec<&str> = element.split(" . ").collect();
                        if fields.len() == 1 {
                            return Value::from(fields[0]);
                        }
                        let concat: Vec<Value> = fields
                            .iter()
                            .enumerate()
                            .map(|(i, field)| match (i, field.parse::<u64>()) {
                                (1, Ok(n)) if named_protocols => Value::from(match n {
                                    6 => "tcp",
                                    17 => "udp",
                                    _ => "sctp",
                                }),
                                (_, Ok(n)) => Value::from(n),
                                (_, Err(_)) => Value::from(*field),
                            })
                            .collect();
                        serde_json::json!({ "concat": concat })
                    })
                    .collect();
                let mut set = serde_json::json!({
                    "family": "inet", "name": name, "table": TABLE, "handle": 1,
                });
                if !elem.is_empty() {
                    set["elem"] = Value::from(elem);
                }
                serde_json::json!({ "set": set })
            })
            .collect();
        serde_json::json!({ "nftables": sets }).to_string()
    }

    fn hairpins_of(state: &NftState) -> BTreeSet<Hairpin> {
        hairpins(state).collect()
    }

    proptest! {
        #[test]
        fn parse_inverts_render(state in arb_state(), numeric in any::<bool>()) {
            // The services are recorded; of the destinations, what the hairpin set holds (the
            // dataplane pairs them with the IPVS dump).
            let listed = parse_table(&nft_like_json(&state, numeric)).expect("parse");
            let recorded = NftState {
                services: state.services.clone(),
                source_ranges: state.source_ranges.clone(),
                node_addresses: state.node_addresses.clone(),
                ..NftState::default()
            };
            prop_assert_eq!(listed.state, recorded);
            prop_assert_eq!(listed.hairpins, hairpins_of(&state));
        }
    }

    #[test]
    fn reads_source_ranges_in_every_form_nft_prints() {
        let json = r#"{"nftables": [
            {"set": {"family": "inet", "name": "lb-firewall4", "table": "topoproxy",
                     "elem": [{"concat": ["203.0.113.50", "tcp", 80]}]}},
            {"set": {"family": "inet", "name": "lb-sources-tcp4", "table": "topoproxy",
                     "elem": [{"concat": ["203.0.113.50", 80, {"prefix": {"addr": "10.0.0.0", "len": 8}}]},
                              {"concat": ["203.0.113.50", 80, {"range": ["192.0.2.0", "192.0.2.15"]}]},
                              {"concat": ["203.0.113.50", 80, "198.51.100.7"]}]}},
            {"set": {"family": "inet", "name": "lb-from-node4", "table": "topoproxy",
                     "elem": [{"concat": ["203.0.113.50", "tcp", 80, "203.0.113.50"]}]}},
            {"set": {"family": "inet", "name": "node-addresses6", "table": "topoproxy",
                     "elem": ["2001:db8::7"]}}
        ]}"#;
        let listed = parse_table(json).expect("parse");
        let key = VsKey::new(Protocol::Tcp, "203.0.113.50".parse().expect("ip"), 80);
        let ranges = &listed.state.source_ranges[&key];
        let text: Vec<String> = ranges.allowed.iter().map(ToString::to_string).collect();
        assert_eq!(text, ["10.0.0.0/8", "192.0.2.0/28", "198.51.100.7/32"]);
        assert!(ranges.from_node);
        assert_eq!(
            listed.state.node_addresses,
            ["2001:db8::7".parse().expect("ip")].into()
        );
        let (first, last) = (
            "10.0.0.0".parse().expect("ip"),
            "10.0.0.5".parse().expect("ip"),
        );
        assert_eq!(prefix_of_range(first, last), None);
    }

    #[test]
    fn ignores_other_tables_unknown_sets_and_the_vips_set() {
        let json = r#"{"nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"set": {"family": "inet", "name": "clusterip-cluster4", "table": "other",
                     "elem": [{"concat": ["10.0.0.1", "tcp", 80]}]}},
            {"set": {"family": "ip", "name": "clusterip-cluster4", "table": "topoproxy",
                     "elem": [{"concat": ["10.0.0.1", "tcp", 80]}]}},
            {"set": {"family": "inet", "name": "future-set4", "table": "topoproxy",
                     "elem": ["garbage"]}},
            {"set": {"family": "inet", "name": "vips4", "table": "topoproxy",
                     "elem": ["10.0.0.9"]}},
            {"set": {"family": "inet", "name": "hairpin4", "table": "topoproxy",
                     "elem": [{"concat": ["10.0.0.2", "tcp", 80, "10.0.0.2"]}]}},
            {"set": {"family": "inet", "name": "nodeport-local4", "table": "topoproxy",
                     "elem": [{"elem": {"val": {"concat": ["10.0.0.3", 17, "30053"]},
                                        "comment": "wrapped"}}]}}
        ]}"#;
        let listed = parse_table(json).expect("parse");
        let key = VsKey::new(Protocol::Udp, "10.0.0.3".parse().expect("ip"), 30053);
        assert_eq!(
            listed.state.services.into_iter().collect::<Vec<_>>(),
            vec![(key, (Frontend::NodePort, TrafficPolicy::Local))]
        );
        assert!(listed.state.destinations.is_empty());
        assert_eq!(
            listed.hairpins.into_iter().collect::<Vec<_>>(),
            vec![("10.0.0.2".parse().expect("ip"), Protocol::Tcp, 80)]
        );
    }

    #[test]
    fn rejects_malformed_elements() {
        let cases = [
            // Wrong family for the set.
            r#"{"set": {"family": "inet", "name": "clusterip-cluster4", "table": "topoproxy",
                        "elem": [{"concat": ["fd00::1", "tcp", 80]}]}}"#,
            // Unknown protocol.
            r#"{"set": {"family": "inet", "name": "clusterip-cluster4", "table": "topoproxy",
                        "elem": [{"concat": ["10.0.0.1", "icmp", 80]}]}}"#,
            // Port out of range.
            r#"{"set": {"family": "inet", "name": "clusterip-cluster4", "table": "topoproxy",
                        "elem": [{"concat": ["10.0.0.1", "tcp", 70000]}]}}"#,
            // Too few fields.
            r#"{"set": {"family": "inet", "name": "destinations4", "table": "topoproxy",
                        "elem": [{"concat": ["10.0.0.1", "tcp", 80, "10.0.0.2"]}]}}"#,
            // A hairpin element whose two addresses differ.
            r#"{"set": {"family": "inet", "name": "hairpin4", "table": "topoproxy",
                        "elem": [{"concat": ["10.0.0.1", "tcp", 80, "10.0.0.2"]}]}}"#,
            // Not a concatenation.
            r#"{"set": {"family": "inet", "name": "clusterip-cluster4", "table": "topoproxy",
                        "elem": ["10.0.0.1"]}}"#,
        ];
        for case in cases {
            let json = format!(r#"{{"nftables": [{case}]}}"#);
            let error = parse_table(&json).expect_err(case);
            assert!(
                matches!(error, ParseError::Element { .. }),
                "{case}: {error}"
            );
        }
        assert!(matches!(parse_table("{}"), Err(ParseError::Shape)));
        assert!(matches!(parse_table("nope"), Err(ParseError::Json(_))));
    }

    #[test]
    fn rejects_a_key_recorded_twice() {
        let json = r#"{"nftables": [
            {"set": {"family": "inet", "name": "clusterip-cluster4", "table": "topoproxy",
                     "elem": [{"concat": ["10.0.0.1", "tcp", 80]}]}},
            {"set": {"family": "inet", "name": "clusterip-local4", "table": "topoproxy",
                     "elem": [{"concat": ["10.0.0.1", "tcp", 80]}]}}
        ]}"#;
        assert!(matches!(
            parse_table(json),
            Err(ParseError::Duplicate { .. })
        ));
    }
}
