//! Map I/O: the pinned maps opened by the loader, as the [`LbMaps`] seam the slot layout
//! writes through, and the per-CPU counters read for `topoproxy list` and metrics. The reads
//! are free functions over one map each, so that [`super::inspect`] reads the same way
//! through maps it opens itself.

use std::io;
use std::net::IpAddr;

use std::path::Path;

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuHashMap};
use ipnetwork::IpNetwork;
use topoproxy_common::{self as abi, maps, MAPS_DIR};

use super::datapath_log::DatapathLog;
use super::lb_maps::{LbMaps, LbRead};
use super::list::{CounterRead, ServiceCounters};
use super::{convert, EbpfError};
use crate::kernel_writes;

/// The maps, opened from their pins.
pub(crate) struct PinnedMaps {
    pub(super) services: HashMap<MapData, abi::ServiceKey, abi::Service>,
    pub(super) backends: HashMap<MapData, abi::BackendKey, abi::Backend>,
    /// Written by the programs; read to find the sockets sent to a removed backend.
    pub(super) rev_nat: HashMap<MapData, abi::RevNatKey, abi::Endpoint>,
    #[allow(dead_code)]
    pub(super) affinity: HashMap<MapData, abi::AffinityKey, abi::AffinityValue>,
    pub(super) service_stats: PerCpuHashMap<MapData, u32, abi::ServiceStats>,
    pub(super) backend_stats: PerCpuHashMap<MapData, abi::BackendStatsKey, abi::BackendStats>,
    pub(super) log_config: Array<MapData, abi::LogConfig>,
    /// `loadBalancerSourceRanges`, read by the tc programs.
    pub(super) source_ranges: LpmTrie<MapData, abi::SourceRangeKey, u8>,
    /// The Maglev tables of `sh`/`mh` services.
    pub(super) maglev: HashMap<MapData, abi::MaglevKey, abi::MaglevTable>,
}

pub(super) fn map_error(
    map: &'static str,
    call: &'static str,
) -> impl FnOnce(MapError) -> EbpfError {
    move |source| EbpfError::Map {
        map,
        call,
        source: Box::new(source),
    }
}

fn is_missing(error: &MapError) -> bool {
    match error {
        MapError::KeyNotFound => true,
        MapError::SyscallError(syscall) => syscall.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// Treats an absent key as success (deletes are idempotent).
fn ignore_missing(result: Result<(), MapError>, map: &'static str) -> Result<(), EbpfError> {
    match result {
        Ok(()) => Ok(()),
        Err(error) if is_missing(&error) => Ok(()),
        Err(error) => Err(map_error(map, "delete")(error)),
    }
}

impl LbRead for PinnedMaps {
    fn services(&self) -> Result<Vec<(abi::ServiceKey, abi::Service)>, EbpfError> {
        read_services(&self.services)
    }

    fn backend(&self, key: &abi::BackendKey) -> Result<Option<abi::Backend>, EbpfError> {
        read_backend(&self.backends, key)
    }

    fn backend_keys(&self) -> Result<Vec<abi::BackendKey>, EbpfError> {
        read_backend_keys(&self.backends)
    }

    fn source_ranges(&self) -> Result<Vec<(u32, IpNetwork)>, EbpfError> {
        read_source_ranges(&self.source_ranges)
    }
}

impl CounterRead for PinnedMaps {
    fn service_counters(&self, id: u32) -> Result<ServiceCounters, EbpfError> {
        read_service_counters(&self.service_stats, id)
    }

    fn backend_connections(&self, id: u32, address: IpAddr, port: u16) -> Result<u64, EbpfError> {
        read_backend_connections(&self.backend_stats, id, address, port)
    }
}

/// Every entry of the services map.
pub(super) fn read_services(
    map: &HashMap<MapData, abi::ServiceKey, abi::Service>,
) -> Result<Vec<(abi::ServiceKey, abi::Service)>, EbpfError> {
    map.iter()
        .map(|item| item.map_err(map_error(maps::SERVICES, "iterate")))
        .collect()
}

/// One backend slot; `None` when it is empty.
pub(super) fn read_backend(
    map: &HashMap<MapData, abi::BackendKey, abi::Backend>,
    key: &abi::BackendKey,
) -> Result<Option<abi::Backend>, EbpfError> {
    match map.get(key, 0) {
        Ok(backend) => Ok(Some(backend)),
        Err(error) if is_missing(&error) => Ok(None),
        Err(error) => Err(map_error(maps::BACKENDS, "lookup")(error)),
    }
}

/// The keys of every filled backend slot.
pub(super) fn read_backend_keys(
    map: &HashMap<MapData, abi::BackendKey, abi::Backend>,
) -> Result<Vec<abi::BackendKey>, EbpfError> {
    map.keys()
        .map(|key| key.map_err(map_error(maps::BACKENDS, "iterate")))
        .collect()
}

/// Every source range, by service id. An entry no agent writes (a bad prefix length or
/// family) is skipped with a warning.
pub(super) fn read_source_ranges(
    map: &LpmTrie<MapData, abi::SourceRangeKey, u8>,
) -> Result<Vec<(u32, IpNetwork)>, EbpfError> {
    let mut ranges = Vec::new();
    for item in map.iter() {
        let (key, family) = item.map_err(map_error(maps::SOURCE_RANGES, "iterate"))?;
        match convert::from_source_range_key(&key, family) {
            Some(range) => ranges.push(range),
            None => tracing::warn!(
                prefix_len = key.prefix_len(),
                family,
                "skipping a source range entry no agent writes"
            ),
        }
    }
    Ok(ranges)
}

/// One service's counters, summed over CPUs.
pub(super) fn read_service_counters(
    map: &PerCpuHashMap<MapData, u32, abi::ServiceStats>,
    id: u32,
) -> Result<ServiceCounters, EbpfError> {
    match map.get(&id, 0) {
        Ok(values) => {
            Ok(values
                .iter()
                .fold(ServiceCounters::default(), |sum, v| ServiceCounters {
                    translations: sum.translations + v.translations,
                    affinity_hits: sum.affinity_hits + v.affinity_hits,
                    no_backend: sum.no_backend + v.no_backend,
                }))
        }
        Err(error) if is_missing(&error) => Ok(ServiceCounters::default()),
        Err(error) => Err(map_error(maps::SERVICE_STATS, "lookup")(error)),
    }
}

/// Connects sent to one backend of a service, summed over CPUs.
pub(super) fn read_backend_connections(
    map: &PerCpuHashMap<MapData, abi::BackendStatsKey, abi::BackendStats>,
    id: u32,
    address: IpAddr,
    port: u16,
) -> Result<u64, EbpfError> {
    let key = abi::BackendStatsKey {
        service_id: id,
        backend: convert::endpoint(address, port),
    };
    match map.get(&key, 0) {
        Ok(values) => Ok(values.iter().map(|v| v.connections).sum()),
        Err(error) if is_missing(&error) => Ok(0),
        Err(error) => Err(map_error(maps::BACKEND_STATS, "lookup")(error)),
    }
}

impl LbMaps for PinnedMaps {
    fn put_service(&mut self, key: abi::ServiceKey, value: abi::Service) -> Result<(), EbpfError> {
        self.services
            .insert(key, value, 0)
            .map_err(map_error(maps::SERVICES, "update"))
            .inspect(|()| kernel_writes::done("eBPF service put"))
    }

    fn delete_service(&mut self, key: &abi::ServiceKey) -> Result<(), EbpfError> {
        ignore_missing(self.services.remove(key), maps::SERVICES)
            .inspect(|()| kernel_writes::done("eBPF service deleted"))
    }

    fn put_backend(&mut self, key: abi::BackendKey, value: abi::Backend) -> Result<(), EbpfError> {
        self.backends
            .insert(key, value, 0)
            .map_err(map_error(maps::BACKENDS, "update"))
            .inspect(|()| kernel_writes::done("eBPF backend put"))
    }

    fn delete_backend(&mut self, key: &abi::BackendKey) -> Result<(), EbpfError> {
        ignore_missing(self.backends.remove(key), maps::BACKENDS)
            .inspect(|()| kernel_writes::done("eBPF backend deleted"))
    }

    fn put_source_range(&mut self, id: u32, range: IpNetwork) -> Result<(), EbpfError> {
        let (key, family) = convert::source_range_entry(id, range);
        self.source_ranges
            .insert(&key, family, 0)
            .map_err(map_error(maps::SOURCE_RANGES, "update"))
            .inspect(|()| kernel_writes::done("eBPF source range put"))
    }

    fn delete_source_range(&mut self, id: u32, range: IpNetwork) -> Result<(), EbpfError> {
        let (key, _) = convert::source_range_entry(id, range);
        ignore_missing(self.source_ranges.remove(&key), maps::SOURCE_RANGES)
            .inspect(|()| kernel_writes::done("eBPF source range deleted"))
    }

    fn maglev_tables(&self) -> Result<Vec<(abi::MaglevKey, abi::MaglevTable)>, EbpfError> {
        self.maglev
            .iter()
            .map(|item| item.map_err(map_error(maps::MAGLEV, "iterate")))
            .collect()
    }

    fn put_maglev_table(
        &mut self,
        key: abi::MaglevKey,
        table: &abi::MaglevTable,
    ) -> Result<(), EbpfError> {
        self.maglev
            .insert(key, table, 0)
            .map_err(map_error(maps::MAGLEV, "update"))
            .inspect(|()| kernel_writes::done("eBPF Maglev table put"))
    }

    fn delete_maglev_table(&mut self, key: &abi::MaglevKey) -> Result<(), EbpfError> {
        ignore_missing(self.maglev.remove(key), maps::MAGLEV)
            .inspect(|()| kernel_writes::done("eBPF Maglev table deleted"))
    }

    fn delete_backend_stats(&mut self, key: &abi::BackendStatsKey) {
        let _ = self.backend_stats.remove(key);
    }

    fn delete_service_stats(&mut self, id: u32) {
        let _ = self.service_stats.remove(&id);
    }

    fn grace_period(&mut self) -> Result<(), EbpfError> {
        synchronize_rcu()
    }
}

/// `MEMBARRIER_CMD_GLOBAL`: the kernel answers it with `synchronize_rcu()`.
const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;

/// Waits for an RCU grace period. cgroup `sock_addr` programs run inside an RCU read-side
/// section (`bpf_prog_run_array_cg`), so once it ends every program run that started before
/// has returned. The kernel refuses it on `nohz_full` systems (`EINVAL`).
fn synchronize_rcu() -> Result<(), EbpfError> {
    // SAFETY: membarrier takes two integers and touches no memory of ours.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if rc != 0 {
        return Err(EbpfError::GracePeriod(io::Error::last_os_error()));
    }
    Ok(())
}

impl PinnedMaps {
    /// Switches the programs' diagnostics; they see it at their next run.
    pub(super) fn set_datapath_log(&mut self, log: DatapathLog) -> Result<(), EbpfError> {
        write_log_config(&mut self.log_config, log)
    }
}

fn write_log_config(
    map: &mut Array<MapData, abi::LogConfig>,
    log: DatapathLog,
) -> Result<(), EbpfError> {
    let config = abi::LogConfig {
        events: log.events,
        per_second: log.per_second,
    };
    map.set(0, config, 0)
        .map_err(map_error(maps::LOG_CONFIG, "update"))
}

/// Switches the diagnostics of the programs pinned in `pin_dir`, from outside the agent.
pub fn set_datapath_log(pin_dir: &Path, log: DatapathLog) -> Result<(), EbpfError> {
    let path = pin_dir.join(MAPS_DIR).join(maps::LOG_CONFIG);
    let data = MapData::from_pin(&path).map_err(map_error(maps::LOG_CONFIG, "open"))?;
    let mut map = Array::try_from(Map::Array(data)).map_err(map_error(maps::LOG_CONFIG, "open"))?;
    write_log_config(&mut map, log)
}
