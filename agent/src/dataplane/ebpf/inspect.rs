//! `topoproxy list` in eBPF mode: the table an agent pinned, read from outside the agent.
//!
//! Only the agent writes its maps. A reader that opened the dataplane as the agent does would
//! load programs, attach where a link pin is missing, swap its own programs into the links when
//! its version differs, repair entries and free backend slots no written entry counts yet, which
//! are exactly the slots the agent is filling in the middle of an apply. So this path opens the
//! pinned maps by their pins through descriptors the kernel refuses writes on (`BPF_F_RDONLY`),
//! decodes them with the agent's own decoder ([`super::layout::decode`]) and touches nothing
//! else: no program, no link, no pin.

use std::path::{Path, PathBuf};

use aya::maps::{HashMap, LpmTrie, Map, MapData, MapError, PerCpuHashMap};
use topoproxy_common::{self as abi, maps, MAPS_DIR};

use super::lb_maps::LbRead;
use super::list::{read_listing, CounterRead, Listing, ServiceCounters};
use super::loader::{bpf_obj_get_read_only, maps_pinned};
use super::maps::{
    read_backend, read_backend_connections, read_backend_keys, read_service_counters,
    read_services, read_source_ranges,
};
use super::EbpfError;

/// Why the pinned maps could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(
        "no maps of this version are pinned in {}: is topoproxy (this version) running in eBPF mode (--bpf-pin-dir)?",
        pin_dir.display()
    )]
    NotPinned { pin_dir: PathBuf },
    #[error("opening the pinned map {} read-only failed", path.display())]
    OpenPin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not the map topoproxy pins there", path.display())]
    NotOurMap {
        path: PathBuf,
        #[source]
        source: Box<MapError>,
    },
    #[error("reading the maps pinned in {} failed", pin_dir.display())]
    Read {
        pin_dir: PathBuf,
        #[source]
        source: Box<EbpfError>,
    },
}

/// Whether an agent's maps are pinned under `pin_dir` (what `list` without `--proxy-mode`
/// takes for "this node runs eBPF mode").
pub fn agent_pinned(pin_dir: &Path) -> bool {
    pin_dir.join(MAPS_DIR).join(maps::SERVICES).exists()
}

/// The maps `topoproxy list` reads, opened read-only from their pins.
struct ReadOnlyMaps {
    services: HashMap<MapData, abi::ServiceKey, abi::Service>,
    backends: HashMap<MapData, abi::BackendKey, abi::Backend>,
    service_stats: PerCpuHashMap<MapData, u32, abi::ServiceStats>,
    backend_stats: PerCpuHashMap<MapData, abi::BackendStatsKey, abi::BackendStats>,
    source_ranges: LpmTrie<MapData, abi::SourceRangeKey, u8>,
}

impl ReadOnlyMaps {
    fn open(pin_dir: &Path) -> Result<Self, InspectError> {
        let maps_dir = pin_dir.join(MAPS_DIR);
        Ok(Self {
            services: open(&maps_dir, maps::SERVICES, |map| {
                HashMap::try_from(Map::HashMap(map))
            })?,
            backends: open(&maps_dir, maps::BACKENDS, |map| {
                HashMap::try_from(Map::HashMap(map))
            })?,
            service_stats: open(&maps_dir, maps::SERVICE_STATS, |map| {
                PerCpuHashMap::try_from(Map::PerCpuHashMap(map))
            })?,
            backend_stats: open(&maps_dir, maps::BACKEND_STATS, |map| {
                PerCpuHashMap::try_from(Map::PerCpuHashMap(map))
            })?,
            source_ranges: open(&maps_dir, maps::SOURCE_RANGES, |map| {
                LpmTrie::try_from(Map::LpmTrie(map))
            })?,
        })
    }
}

/// Opens the map pinned as `maps_dir/name` read-only, as the typed map `typed` makes of it
/// (which checks the key and value sizes against the kernel's).
fn open<T>(
    maps_dir: &Path,
    name: &str,
    typed: impl FnOnce(MapData) -> Result<T, MapError>,
) -> Result<T, InspectError> {
    let path = maps_dir.join(name);
    let fd = bpf_obj_get_read_only(&path).map_err(|source| InspectError::OpenPin {
        path: path.clone(),
        source,
    })?;
    MapData::from_fd(fd)
        .and_then(typed)
        .map_err(|source| InspectError::NotOurMap {
            path,
            source: Box::new(source),
        })
}

impl LbRead for ReadOnlyMaps {
    fn services(&self) -> Result<Vec<(abi::ServiceKey, abi::Service)>, EbpfError> {
        read_services(&self.services)
    }

    fn backend(&self, key: &abi::BackendKey) -> Result<Option<abi::Backend>, EbpfError> {
        read_backend(&self.backends, key)
    }

    fn backend_keys(&self) -> Result<Vec<abi::BackendKey>, EbpfError> {
        read_backend_keys(&self.backends)
    }

    fn source_ranges(&self) -> Result<Vec<(u32, ipnetwork::IpNetwork)>, EbpfError> {
        read_source_ranges(&self.source_ranges)
    }
}

impl CounterRead for ReadOnlyMaps {
    fn service_counters(&self, id: u32) -> Result<ServiceCounters, EbpfError> {
        read_service_counters(&self.service_stats, id)
    }

    fn backend_connections(
        &self,
        id: u32,
        address: std::net::IpAddr,
        port: u16,
    ) -> Result<u64, EbpfError> {
        read_backend_connections(&self.backend_stats, id, address, port)
    }
}

/// The table the agent pinned in `pin_dir`, with the datapath's counters, read without
/// writing anything. Refuses when this version's maps are not all pinned there.
///
/// The agent may be writing while this reads: an entry is read before the slots it counts,
/// and the agent fills slots before it counts them, so a counted slot is missing only when the
/// agent freed it in between (or an agent stopped mid-change left it so); that tier is then
/// listed up to the gap.
pub fn list(pin_dir: &Path) -> Result<Listing, InspectError> {
    if !maps_pinned(pin_dir) {
        return Err(InspectError::NotPinned {
            pin_dir: pin_dir.to_owned(),
        });
    }
    let maps = ReadOnlyMaps::open(pin_dir)?;
    read_listing(&maps).map_err(|source| InspectError::Read {
        pin_dir: pin_dir.to_owned(),
        source: Box::new(source),
    })
}
