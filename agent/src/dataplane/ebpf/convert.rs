//! Conversions between the agent's table types and the map ABI (`topoproxy-common`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use topoproxy_common::{
    flags, Endpoint, Service, ServiceKey, SourceRangeKey, FAMILY_V4, FAMILY_V6, MAX_TIERS,
    SCHEDULER_LEN,
};

use aya::maps::lpm_trie::Key;
use ipnetwork::IpNetwork;

use crate::dataplane::{ServiceConfig, TierShares};
use crate::model::Protocol;
use crate::scheduler::{Scheduler, SchedulerFlags, IP_VS_SVC_F_SCHED_MASK};
use crate::table::{Frontend, SourceRanges, TrafficPolicy, VsKey};

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;

/// An address and port as the kernel hands them to `sock_addr` programs.
pub(super) fn endpoint(address: IpAddr, port: u16) -> Endpoint {
    let (addr, family) = match address {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([word(0), word(4), word(8), word(12)], FAMILY_V6)
        }
    };
    Endpoint {
        addr,
        port: port.to_be(),
        family,
        _pad: 0,
    }
}

/// The address and port of an endpoint; `None` for an unknown family.
pub(super) fn from_endpoint(endpoint: &Endpoint) -> Option<(IpAddr, u16)> {
    let port = u16::from_be(endpoint.port);
    let address = match endpoint.family {
        FAMILY_V4 => IpAddr::V4(Ipv4Addr::from(endpoint.addr[0].to_ne_bytes())),
        FAMILY_V6 => {
            let mut octets = [0u8; 16];
            for (chunk, word) in octets.chunks_exact_mut(4).zip(endpoint.addr) {
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some((address, port))
}

pub(super) fn service_key(key: &VsKey) -> ServiceKey {
    let endpoint = endpoint(key.address, key.port);
    ServiceKey {
        addr: endpoint.addr,
        port: endpoint.port,
        protocol: match key.protocol {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
            Protocol::Sctp => IPPROTO_SCTP,
        },
        family: endpoint.family,
    }
}

pub(super) fn vs_key(key: &ServiceKey) -> Option<VsKey> {
    let protocol = match key.protocol {
        IPPROTO_TCP => Protocol::Tcp,
        IPPROTO_UDP => Protocol::Udp,
        IPPROTO_SCTP => Protocol::Sctp,
        _ => return None,
    };
    let (address, port) = from_endpoint(&Endpoint {
        addr: key.addr,
        port: key.port,
        family: key.family,
        _pad: 0,
    })?;
    Some(VsKey::new(protocol, address, port))
}

/// Whether the IPVS scheduler hashes the client (source hashing `sh`, Maglev `mh`): in eBPF
/// mode such a service gets Maglev tables and the [`flags::MAGLEV`] flag.
pub(super) fn consistent_hash(scheduler: &Scheduler) -> bool {
    matches!(scheduler.name(), "sh" | "mh")
}

/// The scheduler flag bits (`IP_VS_SVC_F_SCHED1..3`, 0x8..0x20) shifted into one byte.
const SCHEDULER_FLAG_SHIFT: u32 = 3;

fn scheduler_flag_byte(flag_bits: u32) -> u8 {
    u8::try_from((flag_bits & IP_VS_SVC_F_SCHED_MASK) >> SCHEDULER_FLAG_SHIFT).unwrap_or(0)
}

/// The service entry for `config`, with the given id and tier counts.
pub(super) fn service_value(
    id: u32,
    config: &ServiceConfig,
    tier_counts: [u16; MAX_TIERS],
) -> Service {
    // The name, NUL-padded, and the flag bits in the last byte (names are 5 bytes at most).
    let mut scheduler = [0u8; SCHEDULER_LEN];
    let name = config.scheduler.name().as_bytes();
    let len = name.len().min(SCHEDULER_LEN - 1);
    scheduler[..len].copy_from_slice(&name[..len]);
    scheduler[SCHEDULER_LEN - 1] = scheduler_flag_byte(config.scheduler.flags.kernel_bits());
    let frontend = match config.frontend {
        Frontend::ClusterIP => 0,
        Frontend::ExternalIP => 1,
        Frontend::LoadBalancer => 2,
        Frontend::NodePort => 3,
    };
    let policy = match config.traffic_policy {
        TrafficPolicy::Cluster => 0,
        TrafficPolicy::Local => flags::TRAFFIC_POLICY_LOCAL,
    };
    let firewall = match &config.source_ranges {
        ranges if ranges.is_open() => 0,
        ranges if ranges.from_node => flags::SOURCE_RANGES | flags::SOURCE_RANGES_FROM_NODE,
        _ => flags::SOURCE_RANGES,
    };
    // `sh-port`/`mh-port` hash the client's port too, as the kernel's schedulers do.
    let hashing = match consistent_hash(&config.scheduler) {
        false => 0,
        true if config.scheduler.flags.contains(SchedulerFlags::PORT) => {
            flags::MAGLEV | flags::HASH_SOURCE_PORT
        }
        true => flags::MAGLEV,
    };
    Service {
        id,
        affinity_timeout: config.persistence_timeout.unwrap_or(0),
        flags: frontend | policy | firewall | hashing,
        tier_counts,
        tier_shares: config.tier_shares.0,
        scheduler,
    }
}

/// The config of a service entry; its source ranges are `ranges` (those written under its id)
/// when the entry flags them, and none otherwise.
pub(super) fn service_config(value: &Service, ranges: &[IpNetwork]) -> ServiceConfig {
    let end = value
        .scheduler
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(SCHEDULER_LEN - 1);
    let name = String::from_utf8_lossy(&value.scheduler[..end]);
    let flag_bits = u32::from(value.scheduler[SCHEDULER_LEN - 1]) << SCHEDULER_FLAG_SHIFT;
    ServiceConfig {
        scheduler: Scheduler::from_kernel(&name, flag_bits),
        persistence_timeout: (value.affinity_timeout != 0).then_some(value.affinity_timeout),
        frontend: match value.flags & flags::FRONTEND_MASK {
            0 => Frontend::ClusterIP,
            1 => Frontend::ExternalIP,
            2 => Frontend::LoadBalancer,
            _ => Frontend::NodePort,
        },
        traffic_policy: if value.flags & flags::TRAFFIC_POLICY_LOCAL != 0 {
            TrafficPolicy::Local
        } else {
            TrafficPolicy::Cluster
        },
        tier_shares: TierShares(value.tier_shares),
        source_ranges: if value.flags & flags::SOURCE_RANGES != 0 {
            let mut allowed = ranges.to_vec();
            allowed.sort();
            allowed.dedup();
            SourceRanges {
                allowed,
                from_node: value.flags & flags::SOURCE_RANGES_FROM_NODE != 0,
            }
        } else {
            SourceRanges::default()
        },
    }
}

/// The `TP_SRC_RANGES` key and value of one range of service `id`: the id's 32 bits, then
/// the range; the value is its family.
pub(super) fn source_range_entry(id: u32, range: IpNetwork) -> (Key<SourceRangeKey>, u8) {
    let network = endpoint(range.network(), 0);
    let key = Key::new(
        32 + u32::from(range.prefix()),
        SourceRangeKey {
            service_id: id,
            addr: network.addr,
        },
    );
    (key, network.family)
}

/// The service id and range of a `TP_SRC_RANGES` entry; `None` for one no agent writes.
pub(super) fn from_source_range_key(
    key: &Key<SourceRangeKey>,
    family: u8,
) -> Option<(u32, IpNetwork)> {
    let data = key.data();
    let prefix = u8::try_from(key.prefix_len().checked_sub(32)?).ok()?;
    let (address, _) = from_endpoint(&Endpoint {
        addr: data.addr,
        port: 0,
        family,
        _pad: 0,
    })?;
    let range = IpNetwork::new(address, prefix).ok()?;
    Some((data.service_id, range))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_network_order_words() {
        let e = endpoint("10.96.0.10".parse().expect("ip"), 53);
        assert_eq!(e.addr[0].to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(e.port.to_ne_bytes(), [0, 53]);
        assert_eq!(e.family, FAMILY_V4);
        for address in ["10.96.0.10", "fd00::1:2", "::ffff:1.2.3.4"] {
            let address: IpAddr = address.parse().expect("ip");
            assert_eq!(
                from_endpoint(&endpoint(address, 8080)),
                Some((address, 8080))
            );
        }
    }

    #[test]
    fn service_keys_and_configs_round_trip() {
        let key = VsKey::new(Protocol::Udp, "fd00::a".parse().expect("ip"), 53);
        assert_eq!(vs_key(&service_key(&key)), Some(key));
        let config = ServiceConfig {
            scheduler: crate::scheduler::Scheduler::default(),
            persistence_timeout: Some(10800),
            frontend: Frontend::LoadBalancer,
            traffic_policy: TrafficPolicy::Local,
            tier_shares: TierShares([700_000, 300_000, 0, 0, 0, 0, 0, 0]),
            source_ranges: Default::default(),
        };
        let value = service_value(7, &config, [1, 2, 0, 0, 0, 0, 0, 0]);
        assert_eq!(service_config(&value, &[]), config);
        assert_eq!(value.tier_shares[1], 300_000);
        assert_eq!(value.tier_counts[1], 2);
        assert_eq!(value.flags & flags::SOURCE_RANGES, 0);
        // The scheduler and its flags come back too (the name, then a flag byte at the end).
        for text in ["mh,mh-fallback,mh-port", "sh,sh-port", "lblcr"] {
            let config = ServiceConfig {
                scheduler: crate::scheduler::Scheduler::parse(text).expect("scheduler"),
                ..config.clone()
            };
            let value = service_value(7, &config, [1, 2, 0, 0, 0, 0, 0, 0]);
            assert_eq!(service_config(&value, &[]), config, "{text}");
        }
    }

    #[test]
    fn hashing_schedulers_set_maglev_and_their_port_flags_the_source_port() {
        let hashing = |text: &str| {
            let config = ServiceConfig {
                scheduler: crate::scheduler::Scheduler::parse(text).expect("scheduler"),
                persistence_timeout: None,
                frontend: Frontend::ClusterIP,
                traffic_policy: TrafficPolicy::Cluster,
                tier_shares: TierShares::default(),
                source_ranges: SourceRanges::default(),
            };
            service_value(3, &config, [0; MAX_TIERS]).flags
                & (flags::MAGLEV | flags::HASH_SOURCE_PORT)
        };
        assert_eq!(hashing("rr"), 0);
        assert_eq!(hashing("wlc"), 0);
        assert_eq!(hashing("mh"), flags::MAGLEV);
        assert_eq!(hashing("sh,sh-fallback"), flags::MAGLEV);
        assert_eq!(
            hashing("mh,mh-port"),
            flags::MAGLEV | flags::HASH_SOURCE_PORT
        );
        assert_eq!(
            hashing("sh,sh-port"),
            flags::MAGLEV | flags::HASH_SOURCE_PORT
        );
    }

    #[test]
    fn source_ranges_round_trip_through_the_flags_and_the_trie_keys() {
        let ranges: Vec<IpNetwork> = ["fd00::/64", "10.0.0.0/8", "192.0.2.7/32"]
            .iter()
            .map(|r| r.parse().expect("range"))
            .collect();
        let mut config = ServiceConfig {
            scheduler: crate::scheduler::Scheduler::default(),
            persistence_timeout: None,
            frontend: Frontend::LoadBalancer,
            traffic_policy: TrafficPolicy::Cluster,
            tier_shares: TierShares::default(),
            source_ranges: SourceRanges {
                allowed: ranges[1..].to_vec(),
                from_node: true,
            },
        };
        let value = service_value(9, &config, [0; MAX_TIERS]);
        assert_eq!(
            value.flags & (flags::SOURCE_RANGES | flags::SOURCE_RANGES_FROM_NODE),
            flags::SOURCE_RANGES | flags::SOURCE_RANGES_FROM_NODE
        );
        // Read back in any order.
        assert_eq!(service_config(&value, &[ranges[2], ranges[1]]), config);
        config.source_ranges.from_node = false;
        let value = service_value(9, &config, [0; MAX_TIERS]);
        assert_eq!(value.flags & flags::SOURCE_RANGES_FROM_NODE, 0);
        assert_eq!(service_config(&value, &ranges[1..]), config);
        // Ranges under an entry without the flag are not its ranges.
        config.source_ranges = SourceRanges::default();
        let value = service_value(9, &config, [0; MAX_TIERS]);
        assert_eq!(service_config(&value, &ranges), config);

        for range in ranges {
            let (key, family) = source_range_entry(9, range);
            // The id's 32 bits, then the range's own prefix.
            assert_eq!(key.prefix_len(), 32 + u32::from(range.prefix()));
            assert_eq!(from_source_range_key(&key, family), Some((9, range)));
        }
        let (v4, _) = source_range_entry(9, "10.0.0.0/8".parse().expect("range"));
        assert_eq!(v4.data().addr, [u32::from_ne_bytes([10, 0, 0, 0]), 0, 0, 0]);
        assert_eq!(from_source_range_key(&v4, 0), None, "unknown family");
    }
}
