//! The eBPF dataplane: socket-level load balancing by cgroup `sock_addr` programs (`ebpf/`)
//! that read Services and backends from pinned BPF maps, which this module writes.
//!
//! It holds every tier of a service ([`TierScope::All`]) with each tier's share of new
//! connections: the datapath draws a tier by share among the non-empty ones (the nearest
//! non-empty one when none has a share), so emptying a tier is one map write and the very next
//! connect lands in the others, without waiting for the agent.
//!
//! - [`maglev`]: the consistent-hash tables of `sh`/`mh` services;
//! - [`layout`]: where backends sit in the maps and the make-before-break write order (pure,
//!   behind the [`lb_maps::LbMaps`] seam);
//! - [`maps`]: the pinned maps behind that seam, and the counters;
//! - [`list`]: what `topoproxy list` shows, and [`inspect`]: reading it from the pins without
//!   writing (the `topoproxy list` command);
//! - [`loader`]: loading, attaching, pinning, adopting and removing the programs;
//! - [`north_south`]: the tc programs for traffic from outside the node, and
//!   [`reserved_ports`]: their SNAT range kept out of the node's ephemeral ports;
//! - [`udp_sockets`]: destroying connected UDP sockets sent to a removed backend.

mod convert;
pub mod datapath_log;
pub mod inspect;
mod layout;
mod lb_maps;
mod list;
pub mod loader;
pub mod maglev;
mod maps;
pub mod north_south;
pub mod reserved_ports;
mod udp_sockets;

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use aya::maps::MapError;
use topoproxy_common::MAX_TIERS;

use crate::dataplane::op::Op;
use crate::table::VsKey;

pub use list::{render_ipvsadm, ListedBackend, ListedService, Listing, ServiceCounters};
pub use loader::{
    cgroup2_mount, cleanup, maps_pinned, program_pin, programs_version, CleanupReport, LoadReport,
    PROGRAMS,
};

pub use datapath_log::DatapathLog;
pub use maps::set_datapath_log;

use datapath_log::{LogReader, ServiceIds};
use layout::SlotLayout;
use list::CounterRead as _;
use loader::MapSwitch;
use maps::PinnedMaps;

use super::{
    error_chain, Capabilities, Dataplane, DataplaneError, ProgrammedTable, ServiceNames,
    ServiceTraffic, Telemetry, TelemetryRead, TierScope,
};

const NAME: &str = "ebpf";

/// Where the eBPF dataplane pins its objects unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/topoproxy";

/// Where the eBPF dataplane pins its objects and which cgroup it attaches to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EbpfSettings {
    /// A directory on bpffs holding our maps, programs and links.
    pub pin_dir: PathBuf,
    /// The cgroup v2 directory to attach to; `None` means the cgroup v2 root (found in
    /// `/proc/self/mountinfo`), which covers every process on the node.
    pub cgroup_path: Option<PathBuf>,
}

impl Default for EbpfSettings {
    fn default() -> Self {
        Self {
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
            cgroup_path: None,
        }
    }
}

impl EbpfSettings {
    /// The cgroup to attach to.
    pub fn cgroup(&self) -> Result<PathBuf, EbpfError> {
        match &self.cgroup_path {
            Some(path) => Ok(path.clone()),
            None => cgroup2_mount(),
        }
    }
}

/// Why the eBPF dataplane failed.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("{call} {path} failed")]
    Io {
        call: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no cgroup2 mount in /proc/self/mountinfo")]
    NoCgroup2,
    #[error("loading the eBPF object (maps pinned in {pin_dir}) failed")]
    Load {
        pin_dir: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("the eBPF object has no map {0}")]
    MissingMap(&'static str),
    #[error("program {program} failed")]
    Program {
        program: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("{0} is not attached through a bpf_link (kernel 5.7 or later needed to pin it)")]
    NoBpfLink(&'static str),
    #[error("pinning {path} failed")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("{call} on map {map} failed")]
    Map {
        map: &'static str,
        call: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error(transparent)]
    Layout(#[from] layout::LayoutError),
    #[error("waiting for an RCU grace period (membarrier) failed")]
    GracePeriod(#[source] io::Error),
    #[error("reading the programs' log ring buffer failed")]
    LogReader(#[source] Box<aya_log::Error>),
    #[error("network interface {0:?} does not exist")]
    NoInterface(String),
    #[error("{0} cluster CIDRs given; the tc programs hold at most {max}", max = topoproxy_common::north_south::MAX_CLUSTER_CIDRS)]
    TooManyClusterCidrs(usize),
}

/// The eBPF dataplane. Dropping it leaves everything pinned and attached.
pub struct EbpfDataplane {
    settings: EbpfSettings,
    maps: PinnedMaps,
    load_report: LoadReport,
    /// Fresh maps waiting for the whole table before the running programs switch to them.
    map_switch: Option<MapSwitch>,
    /// The north-south tc programs: their settings, and once attached (after the map switch:
    /// they must read the maps that hold the table) the devices they run on.
    north_south: Option<NorthSouth>,
    layout: SlotLayout,
    /// Service id → virtual service, for the datapath log readers.
    ids: ServiceIds,
    /// Names for the log readers, once the agent gave them.
    names: Option<ServiceNames>,
    log_reader: Option<LogReader>,
    /// The tc programs' own log ring buffer (loaded apart from the socket programs).
    north_south_log_reader: Option<LogReader>,
    udp_terminator: udp_sockets::UdpTerminator,
}

/// The north-south programs as the dataplane knows them.
struct NorthSouth {
    settings: north_south::NorthSouthSettings,
    /// `None` until attached.
    attached: Option<north_south::NorthSouthReport>,
}

impl EbpfDataplane {
    /// Loads (or adopts) the programs and maps and reads the table back from the maps.
    pub fn open(settings: EbpfSettings) -> Result<Self, EbpfError> {
        let (mut maps, load_report, map_switch) = loader::load(&settings)?;
        let layout = SlotLayout::read(&mut maps)?;
        Ok(Self {
            settings,
            maps,
            load_report,
            map_switch,
            north_south: None,
            layout,
            ids: ServiceIds::default(),
            names: None,
            log_reader: None,
            north_south_log_reader: None,
            udp_terminator: udp_sockets::UdpTerminator::default(),
        })
    }

    /// Switches the programs' diagnostics (off by default) while they run.
    pub fn set_datapath_log(&mut self, log: DatapathLog) -> Result<(), EbpfError> {
        self.maps.set_datapath_log(log)
    }

    /// Starts re-emitting the programs' diagnostics as `tracing` events, naming Services with
    /// `names`.
    pub fn start_datapath_log(&mut self, names: ServiceNames) -> Result<(), EbpfError> {
        let program_id = loader::pinned_program_id(&self.settings.pin_dir)?;
        self.log_reader = Some(self.log_reader_for(program_id, &names)?);
        self.names = Some(names);
        self.refresh_ids();
        self.start_north_south_log()
    }

    /// Reads the tc programs' records too, once they are attached and names are known.
    fn start_north_south_log(&mut self) -> Result<(), EbpfError> {
        let program_id = self
            .north_south
            .as_ref()
            .and_then(|ns| ns.attached.as_ref())
            .and_then(|report| report.program_id);
        let (Some(program_id), Some(names)) = (program_id, &self.names) else {
            return Ok(());
        };
        // A new reader first: the old one reads a ring buffer no attached program writes.
        self.north_south_log_reader = Some(self.log_reader_for(program_id, names)?);
        Ok(())
    }

    /// A reader of the log ring buffer of the programs loaded with `program_id`.
    fn log_reader_for(
        &self,
        program_id: u32,
        names: &ServiceNames,
    ) -> Result<LogReader, EbpfError> {
        LogReader::start(program_id, Arc::clone(&self.ids), Arc::clone(names))
            .map_err(|source| EbpfError::LogReader(Box::new(source)))
    }

    /// Keeps the log reader's id → service view current.
    fn refresh_ids(&self) {
        if self.log_reader.is_none() {
            return;
        }
        if let Ok(mut ids) = self.ids.write() {
            ids.clear();
            ids.extend(self.layout.entries().map(|(key, entry)| (entry.id(), *key)));
        }
    }

    /// Switches the links still running programs on other maps to this agent's, once the
    /// whole table is in its maps. Idempotent; nothing to do after the first success.
    pub fn complete_map_switch(&mut self) -> Result<(), EbpfError> {
        let Some(switch) = self.map_switch.take() else {
            return Ok(());
        };
        let swapped = switch.complete()?;
        tracing::info!(
            programs = swapped.len(),
            "the programs now read this agent's maps"
        );
        Ok(())
    }

    /// Attaches the north-south tc programs now, or once the map switch is complete (then
    /// `None` comes back and [`Dataplane::synced`] attaches them).
    pub fn attach_north_south(
        &mut self,
        settings: north_south::NorthSouthSettings,
    ) -> Result<Option<north_south::NorthSouthReport>, EbpfError> {
        self.north_south = Some(NorthSouth {
            settings,
            attached: None,
        });
        if self.map_switch.is_some() {
            return Ok(None);
        }
        self.attach_north_south_now().map(Some)
    }

    fn attach_north_south_now(&mut self) -> Result<north_south::NorthSouthReport, EbpfError> {
        let Some(ns) = self.north_south.as_mut() else {
            return Ok(north_south::NorthSouthReport::default());
        };
        let report = north_south::attach(&self.settings.pin_dir, &ns.settings)?;
        ns.attached = Some(report.clone());
        self.start_north_south_log()?;
        Ok(report)
    }

    /// After a sync: attaches the tc programs if they waited for the map switch, else brings
    /// them up to date with the node's devices and addresses.
    fn refresh_north_south(&mut self) -> Result<(), EbpfError> {
        if self.map_switch.is_some() {
            return Ok(());
        }
        let Some(ns) = self.north_south.as_mut() else {
            return Ok(());
        };
        let Some(attached) = ns.attached.as_mut() else {
            let report = self.attach_north_south_now()?;
            north_south::log_report(&report);
            return Ok(());
        };
        match north_south::refresh(&self.settings.pin_dir, &ns.settings, &attached.devices)? {
            north_south::Refreshed::Unchanged => Ok(()),
            north_south::Refreshed::Addresses(devices) => {
                tracing::info!(
                    devices = ?devices,
                    "the north-south devices' addresses changed; SNAT sources rewritten"
                );
                attached.devices = devices;
                Ok(())
            }
            north_south::Refreshed::Reattached(report) => {
                north_south::log_report(&report);
                ns.attached = Some(report);
                self.start_north_south_log()
            }
        }
    }

    /// Whether programs still read maps other than this agent's (see [`Self::complete_map_switch`]).
    pub fn map_switch_pending(&self) -> bool {
        self.map_switch.is_some()
    }

    /// What opening found: adopted or freshly attached programs.
    pub fn load_report(&self) -> &LoadReport {
        &self.load_report
    }

    pub fn settings(&self) -> &EbpfSettings {
        &self.settings
    }

    /// Map updates and deletes issued so far (a cost measure: one endpoint change is O(1)).
    pub fn map_writes(&self) -> u64 {
        self.layout.map_writes()
    }

    fn apply_sync(&mut self, ops: &[Op]) -> Result<(), DataplaneError> {
        // Read before the apply forgets a deleted service's backends.
        let removed = udp_sockets::removed_udp_pairs(ops, |key| self.backends_of(key));
        let result = self
            .layout
            .apply(&mut self.maps, ops)
            .map_err(|failures| DataplaneError::apply_failures(NAME, ops, failures));
        self.refresh_ids();
        self.terminate_udp_sockets(&removed);
        result
    }

    /// Every backend of `key` in the agent's copy.
    fn backends_of(&self, key: &VsKey) -> Vec<(IpAddr, u16)> {
        self.layout
            .entries()
            .filter(|(entry_key, _)| *entry_key == key)
            .flat_map(|(_, entry)| entry.tiers().iter().flatten())
            .map(|slot| (slot.address, slot.port))
            .collect()
    }

    /// After the maps no longer hold them: sockets sent to removed UDP backends reconnect
    /// to live ones. A failure is logged; the sync itself succeeded.
    fn terminate_udp_sockets(
        &mut self,
        removed: &std::collections::HashSet<udp_sockets::RemovedPair>,
    ) {
        let rev_nat = &self.maps.rev_nat;
        match self
            .udp_terminator
            .terminate(removed, |key| rev_nat.get(key, 0).ok())
        {
            Ok(done) if done.sockets > 0 => tracing::info!(
                sockets = done.sockets,
                namespaces = done.namespaces,
                skipped_namespaces = done.skipped,
                "destroyed connected UDP sockets of removed backends"
            ),
            Ok(done) => tracing::debug!(
                namespaces = done.namespaces,
                skipped_namespaces = done.skipped,
                "no connected UDP socket of a removed backend"
            ),
            Err(error) => tracing::warn!(
                error = %error_chain(&error),
                "destroying connected UDP sockets of removed backends failed; they keep \
                 sending there until the application reconnects"
            ),
        }
    }

    /// The table read back from the maps.
    pub fn table(&mut self) -> Result<ProgrammedTable, EbpfError> {
        self.layout.reload(&mut self.maps)?;
        Ok(self.layout.table())
    }

    /// Per-service counters, summed over CPUs, for every service the agent programmed. Reads
    /// the counters only: the services are the agent's own copy (current after every apply
    /// and read), so a resync's counters never rewrite an entry.
    pub fn service_counters(&self) -> Result<Vec<(VsKey, ServiceCounters)>, EbpfError> {
        self.layout
            .entries()
            .map(|(key, entry)| Ok((*key, self.maps.service_counters(entry.id())?)))
            .collect()
    }

    /// For services under a locality policy (only those: one lookup per backend), the
    /// connections sent to the backends now in each tier, summed over CPUs. Reads the
    /// counters only, as [`Self::service_counters`].
    pub fn tier_connections(&self) -> Result<Vec<(VsKey, Vec<u64>)>, EbpfError> {
        let mut measured = Vec::new();
        for (key, entry) in self.layout.entries() {
            if !entry.config().tier_shares.is_weighted() {
                continue;
            }
            let mut per_tier = vec![0u64; MAX_TIERS];
            for (total, slots) in per_tier.iter_mut().zip(entry.tiers()) {
                for slot in slots {
                    *total += self
                        .maps
                        .backend_connections(entry.id(), slot.address, slot.port)?;
                }
            }
            measured.push((*key, per_tier));
        }
        Ok(measured)
    }

    /// The table read back from the maps with per-service and per-backend counters, as
    /// `topoproxy list` reads it: without writing, and without touching the agent's copy.
    pub fn list(&self) -> Result<Listing, EbpfError> {
        list::read_listing(&self.maps)
    }
}

impl Dataplane for EbpfDataplane {
    fn name(&self) -> &'static str {
        NAME
    }

    /// Every tier, with its share (the programs spill between them). Source ranges: the tc
    /// programs drop new flows from outside the ranges; the socket programs leave a firewalled
    /// frontend untranslated (docs/parity.md).
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            tier_scope: TierScope::All,
            marks_local_destinations: false,
            enforces_source_ranges: true,
        }
    }

    fn refresh_node_addresses(
        &mut self,
    ) -> impl Future<
        Output = Option<Result<std::collections::BTreeSet<std::net::IpAddr>, DataplaneError>>,
    > + Send {
        // A `kube-ipvs0` left by kube-proxy (or by this agent in IPVS mode) holds VIPs, never
        // node addresses.
        let read = crate::node_addresses::interface_addresses()
            .map(|addresses| {
                crate::node_addresses::kube_proxy_node_addresses(&addresses, Some("kube-ipvs0"))
            })
            .map_err(|error| DataplaneError::read(NAME, error));
        std::future::ready(Some(read))
    }

    fn read(&mut self) -> impl Future<Output = Result<ProgrammedTable, DataplaneError>> + Send {
        let result = self
            .table()
            .map_err(|error| DataplaneError::read(NAME, error));
        async move { result }
    }

    fn apply(&mut self, ops: &[Op]) -> impl Future<Output = Result<(), DataplaneError>> + Send {
        let result = self.apply_sync(ops);
        async move { result }
    }

    fn attach_service_names(&mut self, names: ServiceNames) {
        if let Err(error) = self.start_datapath_log(names) {
            tracing::warn!(error = %error_chain(&error), "datapath diagnostics will not reach the agent's log");
        }
    }

    fn telemetry(&mut self, read: TelemetryRead) -> Telemetry {
        Telemetry {
            kernel_requests: vec![("map_writes", self.layout.map_writes())],
            traffic: match read {
                TelemetryRead::Requests => Vec::new(),
                TelemetryRead::RequestsAndTraffic => self.traffic(),
            },
        }
    }

    async fn synced(&mut self) -> Result<(), DataplaneError> {
        self.complete_map_switch()
            .and_then(|()| self.refresh_north_south())
            .map_err(|error| DataplaneError::finish(NAME, error))
    }
}

impl EbpfDataplane {
    /// Per-service traffic with its per-tier connections; a failed read is logged and leaves
    /// its part empty.
    fn traffic(&self) -> Vec<ServiceTraffic> {
        let mut per_tier: std::collections::HashMap<VsKey, Vec<u64>> = match self.tier_connections()
        {
            Ok(measured) => measured.into_iter().collect(),
            Err(error) => {
                tracing::warn!(error = %error_chain(&error), "reading the per-backend counters failed");
                Default::default()
            }
        };
        match self.service_counters() {
            Ok(counters) => counters
                .into_iter()
                .map(|(key, counters)| ServiceTraffic {
                    key,
                    counters,
                    tier_connections: per_tier.remove(&key).unwrap_or_default(),
                })
                .collect(),
            Err(error) => {
                tracing::warn!(error = %error_chain(&error), "reading the per-service counters failed");
                Vec::new()
            }
        }
    }
}
