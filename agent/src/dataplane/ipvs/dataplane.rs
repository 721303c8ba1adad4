//! [`IpvsDataplane`]: the sync loop's [`Dataplane`] on IPVS, `kube-ipvs0` and nftables.
//!
//! Ownership: the nft table's sets are the record of which virtual services topoproxy owns.
//! They are written *before* a service is created and cleared *after* it is deleted, so a crash
//! at any point leaves no IPVS service of ours unrecorded, and a restart adopts exactly what it
//! owns. Every other IPVS service is foreign and never touched, and so is anything inside
//! `--ipvs-exclude-cidrs`.
//! A read forgets a record only when two reads agree that its service is gone: the service
//! dump can skip services ([`super::records`] says when and why).
//!
//! Cost follows the change: `apply` sends one netlink request per op (pipelined), one nft
//! transaction with just the set elements that changed, and address changes only when a VIP
//! starts or stops being needed. Only `read` (start-up adoption and periodic drift repair)
//! walks the whole table.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use ipnetwork::IpNetwork;

use crate::dataplane::op::{apply_to, Op};
use crate::dataplane::{
    error_chain, Capabilities, Dataplane, DataplaneError, FailedOp, ProgrammedService,
    ProgrammedTable, Telemetry, TelemetryRead,
};
use crate::table::VsKey;

use super::adopt::{self, IpvsRead, Known, ReadService};
use super::commands::{
    self, binds_address, is_not_found, service_id, AfterSuccess, OpCommand, Retry,
};
use super::conntrack::BackendFlow;
use super::drain::{self, DrainKey, DrainVerdict, Draining};
use super::kernel::{IpvsKernel, RealKernel};
use super::link::{LinkError, DUMMY_LINK};
use super::netlink::{
    Command, IpvsDestination, IpvsError, IpvsService, IpvsTimeouts, MessageCounts,
};
use super::nft::render::Hairpin;
use super::nft::{NftError, NftSettings, NftState};
use super::records::Probe;
use super::sysctl::SysctlError;

const NAME: &str = "ipvs";

/// rtnetlink address requests kept in flight at once.
const ADDRESS_REQUESTS_IN_FLIGHT: usize = 64;

/// How often, at most, draining destinations are checked for remaining connections.
const DRAIN_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// How long a removed TCP destination keeps its connections unless configured.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(900);

/// The IPVS dataplane's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpvsSettings {
    /// The dummy link that holds the VIPs.
    pub link_name: String,
    /// IPVS services inside these ranges are never created, changed or removed.
    pub exclude_cidrs: Vec<IpNetwork>,
    /// Masquerading rules.
    pub nft: NftSettings,
    /// Set `arp_ignore`/`arp_announce` so VIPs on `kube-ipvs0` are not announced over ARP.
    pub strict_arp: bool,
    /// How long a removed TCP destination may keep its connections before it is deleted.
    pub drain_timeout: Duration,
    /// IPVS's connection timeouts, set once at start as kube-proxy does (`ipvs.tcpTimeout`,
    /// `ipvs.tcpFinTimeout`, `ipvs.udpTimeout`); all 0 (the default) sets nothing.
    pub timeouts: IpvsTimeouts,
}

impl Default for IpvsSettings {
    fn default() -> Self {
        Self {
            link_name: DUMMY_LINK.to_owned(),
            exclude_cidrs: Vec::new(),
            nft: NftSettings::default(),
            strict_arp: false,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            timeouts: IpvsTimeouts::default(),
        }
    }
}

/// Why the IPVS dataplane could not start.
#[derive(Debug, thiserror::Error)]
pub enum IpvsSetupError {
    #[error("setting the kernel parameters IPVS mode needs")]
    Sysctl(#[from] SysctlError),
    #[error("opening the IPVS netlink family (is the ip_vs module loaded?)")]
    Ipvs(#[from] IpvsError),
    #[error("setting the IPVS connection timeouts (ipvs.tcpTimeout, tcpFinTimeout, udpTimeout)")]
    Timeouts(#[source] IpvsError),
    #[error("preparing the {name} link")]
    Link {
        name: String,
        #[source]
        source: Box<LinkError>,
    },
    #[error("preparing the nftables table")]
    Nft(#[from] NftError),
}

/// The IPVS dataplane, on the kernel (`K` = [`RealKernel`]) or, in unit tests, a fake one.
pub struct IpvsDataplane<K: IpvsKernel = RealKernel> {
    settings: IpvsSettings,
    kernel: K,
    /// The nft sets as last written: the services topoproxy owns and their destinations.
    owned: NftState,
    /// Whether the nft table was rewritten with this process's rules since it started.
    rules_current: bool,
    /// Services asked for inside the exclude CIDRs: reported as asked, never programmed.
    excluded: BTreeMap<VsKey, ProgrammedService>,
    /// How many owned services need each address bound on the dummy link.
    address_users: BTreeMap<IpAddr, usize>,
    /// The node's addresses on its other links, as last read ([`Self::record_node_addresses`]).
    node_addresses: Option<BTreeSet<IpAddr>>,
    /// Addresses the last read found bound that no owned service needs. They are unbound when
    /// the sync ends ([`Dataplane::synced`]), unless its apply took them up: after a crash
    /// between binding a VIP and creating its service, the restart neither unbinds nor rebinds it.
    unneeded_addresses: BTreeSet<IpAddr>,
    /// Recorded services the last read's dump missed without a GET answering for them: their
    /// records are kept until the next read agrees ([`super::records`]).
    suspect_records: BTreeSet<VsKey>,
    draining: Draining,
    last_drain_check: Option<Instant>,
}

impl IpvsDataplane {
    /// Sets the kernel parameters, opens IPVS, and makes sure the dummy link exists. Nothing
    /// is programmed or removed until the sync loop reads and applies.
    pub async fn new(settings: IpvsSettings) -> Result<Self, IpvsSetupError> {
        let kernel = RealKernel::open(&settings).await?;
        Ok(Self::with_kernel(settings, kernel))
    }
}

impl<K: IpvsKernel> IpvsDataplane<K> {
    /// A dataplane that asks `kernel`; as [`IpvsDataplane::new`], it touches nothing until
    /// the sync loop reads and applies.
    pub fn with_kernel(settings: IpvsSettings, kernel: K) -> Self {
        Self {
            settings,
            kernel,
            owned: NftState::default(),
            rules_current: false,
            excluded: BTreeMap::new(),
            address_users: BTreeMap::new(),
            node_addresses: None,
            unneeded_addresses: BTreeSet::new(),
            suspect_records: BTreeSet::new(),
            draining: Draining::new(),
            last_drain_check: None,
        }
    }

    fn is_excluded(&self, address: IpAddr) -> bool {
        adopt::is_excluded(&self.settings.exclude_cidrs, address)
    }

    fn read_error(
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> DataplaneError {
        DataplaneError::read(NAME, source)
    }

    /// Reads the owned part of the kernel's table, re-creating the nft table when it is missing
    /// and rewriting it once per process (settings may have changed), with the hairpin
    /// elements of the destinations IPVS holds. What the read found is judged by
    /// [`adopt::adopt`]; this carries its conclusions out.
    async fn read_owned(&mut self) -> Result<ProgrammedTable, DataplaneError> {
        let mut phases = PhaseTimer::new();
        let rewrite = !self.rules_current;
        let hairpins = self.read_records(rewrite)?;
        phases.lap("nft");
        let read = self.read_ipvs(&mut phases)?;
        let adoption = adopt::adopt(
            &Known {
                owned: &self.owned,
                hairpins: hairpins.as_ref(),
                exclude_cidrs: &self.settings.exclude_cidrs,
                excluded: &self.excluded,
                draining: &self.draining,
                suspects: &self.suspect_records,
            },
            &read,
        );
        if !adoption.suspects.is_empty() {
            tracing::info!(
                records = adoption.suspects.len(),
                "the IPVS service dump missed recorded services and no GET answered for them; keeping their records until the next read"
            );
        }
        self.suspect_records = adoption.suspects;
        self.write_records(adoption.owned, &adoption.forget, rewrite)?;
        phases.lap("nft_write");
        self.address_users = adoption.address_users;
        self.repair_addresses().await.map_err(Self::read_error)?;
        phases.lap("addresses");
        phases.report("read", adoption.table.len());
        Ok(adoption.table)
    }

    /// Step 1 of a read: the records. While every nft write since the last full read
    /// succeeded, our copy is the table, and the table is only checked to be there (listing a
    /// table of 10,000 services costs seconds); else (`rewrite`) the sets are read back and
    /// the hairpin set's elements returned, to rebuild which destinations are node-local.
    fn read_records(&mut self, rewrite: bool) -> Result<Option<BTreeSet<Hairpin>>, DataplaneError> {
        if !rewrite {
            let exists = self.kernel.nft_exists().map_err(Self::read_error)?;
            if !exists {
                tracing::warn!("the nftables table inet topoproxy vanished; re-creating it");
                self.kernel
                    .nft_replace(&self.settings.nft, &self.owned)
                    .map_err(Self::read_error)?;
            }
            return Ok(None);
        }
        let listed = self
            .kernel
            .nft_read()
            .map_err(Self::read_error)?
            .unwrap_or_default();
        self.owned = listed.state;
        if let Some(addresses) = &self.node_addresses {
            self.owned.node_addresses = addresses.clone();
        }
        Ok(Some(listed.hairpins))
    }

    /// Step 2 of a read: the recorded services IPVS has, from the dump, and by a GET for
    /// each recorded service the dump did not list: the dump can skip services
    /// ([`super::records`]), and a service read as absent would have its VIP unbound and be created
    /// again over the destinations it already has.
    fn read_ipvs(&mut self, phases: &mut PhaseTimer) -> Result<IpvsRead, DataplaneError> {
        let recorded = adopt::readable(&self.owned, &self.settings.exclude_cidrs);
        let services = self.kernel.dump_services().map_err(Self::read_error)?;
        phases.lap("ipvs_services");
        let mut read = IpvsRead::default();
        for service in services {
            let key = VsKey::new(service.id.protocol, service.id.address, service.id.port);
            if recorded.contains(&key) {
                let service = self.read_service(service)?;
                read.listed.insert(key, service);
            }
        }
        for key in recorded {
            if !read.listed.contains_key(&key) {
                self.probe(key, &mut read)?;
            }
        }
        let skipped = read.found.len();
        if skipped > 0 {
            tracing::info!(
                services = skipped,
                "the IPVS service dump skipped services of ours (another namespace changed its services meanwhile); read them one by one"
            );
        }
        phases.lap("ipvs_destinations");
        Ok(read)
    }

    /// A service with its destinations.
    fn read_service(&mut self, service: IpvsService) -> Result<ReadService, DataplaneError> {
        let destinations = self
            .kernel
            .destinations(&service.id)
            .map_err(Self::read_error)?;
        Ok(ReadService {
            service,
            destinations,
        })
    }

    /// Asks for a recorded service the dump did not list by its key, and notes the answer.
    fn probe(&mut self, key: VsKey, read: &mut IpvsRead) -> Result<(), DataplaneError> {
        match self.kernel.get_service(&service_id(&key)) {
            Ok(Some(service)) => {
                let service = self.read_service(service)?;
                read.found.insert(key, service);
                read.probes.insert(key, Probe::Present);
            }
            Ok(None) => {
                read.probes.insert(key, Probe::Absent);
            }
            // Without an answer the service is reported absent (re-creating one that
            // exists updates it) and its record waits for the next read's dump.
            Err(error) => tracing::warn!(
                service = %format_key(&key),
                error = %error_chain(&error),
                "could not ask IPVS for a service its dump did not list"
            ),
        }
        Ok(())
    }

    /// Step 3 of a read: holds the records `owned` and writes them: with the whole table when
    /// `rewrite` (its rules may come from an older version or other settings), else, when
    /// records were forgotten, as an update of their own.
    fn write_records(
        &mut self,
        owned: NftState,
        forgotten: &BTreeSet<VsKey>,
        rewrite: bool,
    ) -> Result<(), DataplaneError> {
        if !forgotten.is_empty() {
            tracing::warn!(
                records = forgotten.len(),
                "forgetting ownership records of IPVS services that do not exist (left by an agent stopped between two writes)"
            );
        }
        let recorded = std::mem::replace(&mut self.owned, owned);
        if rewrite {
            self.kernel
                .nft_replace(&self.settings.nft, &self.owned)
                .map_err(Self::read_error)?;
            self.rules_current = true;
        } else if !forgotten.is_empty() {
            if let Err(error) = self.kernel.nft_update(&recorded, &self.owned) {
                self.rules_current = false;
                return Err(Self::read_error(error));
            }
        }
        Ok(())
    }

    /// Binds every address an owned service needs, and marks the dummy link's others for
    /// unbinding at the end of the sync.
    async fn repair_addresses(&mut self) -> Result<(), LinkError> {
        let bound = self.kernel.link_addresses().await?;
        let needed: BTreeSet<IpAddr> = self.address_users.keys().copied().collect();
        let missing: Vec<IpAddr> = needed.difference(&bound).copied().collect();
        if !missing.is_empty() {
            let elsewhere = self.kernel.addresses_elsewhere().await?;
            for address in missing {
                if !elsewhere.contains(&address) {
                    self.kernel.add_address(address).await?;
                }
            }
        }
        self.unneeded_addresses = bound.difference(&needed).copied().collect();
        Ok(())
    }

    /// Reads the node's addresses on its other links and, when they changed, records them in
    /// the nft table, whose input filter then leaves them alone.
    async fn record_node_addresses(&mut self) -> Result<BTreeSet<IpAddr>, DataplaneError> {
        let addresses: BTreeSet<IpAddr> = self
            .kernel
            .addresses_elsewhere()
            .await
            .map_err(Self::read_error)?
            .into_iter()
            .filter(crate::node_addresses::counts_as_node_address)
            .collect();
        self.node_addresses = Some(addresses.clone());
        // Until the first full read the table is not ours to update: that read rewrites it
        // whole, with these addresses.
        if self.rules_current && addresses != self.owned.node_addresses {
            let mut next = self.owned.clone();
            next.node_addresses = addresses.clone();
            if let Err(error) = self.kernel.nft_update(&self.owned, &next) {
                self.rules_current = false;
                return Err(Self::read_error(error));
            }
            self.owned = next;
        }
        Ok(addresses)
    }

    /// Unbinds the addresses the last read found unneeded that no service took up since.
    async fn unbind_unneeded(&mut self) -> Result<(), LinkError> {
        let unneeded = std::mem::take(&mut self.unneeded_addresses);
        for address in unneeded {
            if !self.address_users.contains_key(&address) {
                self.kernel.delete_address(address).await?;
            }
        }
        Ok(())
    }

    /// Deletes draining destinations that have no connections left or ran out of time, at
    /// most once per [`DRAIN_CHECK_INTERVAL`] unless `force`. Returns the problems met, for
    /// the log.
    fn check_drains(&mut self, force: bool, now: Instant) -> Vec<String> {
        if self.draining.is_empty()
            || (!force
                && self
                    .last_drain_check
                    .is_some_and(|at| now.duration_since(at) < DRAIN_CHECK_INTERVAL))
        {
            return Vec::new();
        }
        self.last_drain_check = Some(now);
        let mut problems = Vec::new();
        let mut deletions = Vec::new();
        for service in self.draining.services() {
            match self.kernel.destinations(&service_id(&service)) {
                Ok(list) => deletions.extend(self.judge_drains(&service, &list, now)),
                Err(error) if is_not_found(&error) => self.draining.forget_service(&service),
                Err(error) => problems.push(format!(
                    "checking draining destinations: {}",
                    error_chain(&error)
                )),
            }
        }
        problems.extend(self.delete_drained(&deletions));
        problems
    }

    /// The draining destinations of `service` that may go now, given the destinations IPVS
    /// holds for it; drains whose destination is already gone end here.
    fn judge_drains(
        &mut self,
        service: &VsKey,
        held: &[IpvsDestination],
        now: Instant,
    ) -> Vec<DrainKey> {
        let connections: BTreeMap<(IpAddr, u16), u64> = held
            .iter()
            .map(|d| {
                let count = u64::from(d.active_connections) + u64::from(d.inactive_connections);
                ((d.address, d.port), count)
            })
            .collect();
        let mut deletions = Vec::new();
        for key in self.draining.of_service(service).collect::<Vec<_>>() {
            let Some(&count) = connections.get(&(key.address, key.port)) else {
                self.draining.cancel(&key);
                continue;
            };
            let since = self.draining.since(&key).unwrap_or(now);
            let verdict = drain::verdict(since, now, self.settings.drain_timeout, count);
            if verdict == DrainVerdict::TimedOut {
                tracing::warn!(
                    service = %format_key(&key.service),
                    destination = %SocketAddr::new(key.address, key.port),
                    connections = count,
                    "drain timeout passed; deleting the destination with connections open"
                );
            }
            if verdict != DrainVerdict::Keep {
                deletions.push(key);
            }
        }
        deletions
    }

    /// Deletes drained destinations (one pipelined batch); those deleted or already gone stop
    /// draining. Returns the problems met.
    fn delete_drained(&mut self, deletions: &[DrainKey]) -> Vec<String> {
        if deletions.is_empty() {
            return Vec::new();
        }
        let commands: Vec<Command> = deletions
            .iter()
            .map(|key| Command::DelDestination(service_id(&key.service), key.address, key.port))
            .collect();
        let mut problems = Vec::new();
        for (key, result) in deletions.iter().zip(self.kernel.execute(&commands)) {
            match result {
                Ok(()) => {
                    self.draining.cancel(key);
                }
                Err(error) if is_not_found(&error) => {
                    self.draining.cancel(key);
                }
                Err(error) => problems.push(format!(
                    "deleting drained destination {} of {}: {}",
                    SocketAddr::new(key.address, key.port),
                    format_key(&key.service),
                    error_chain(&error)
                )),
            }
        }
        problems
    }

    /// Request counts by kind since the dataplane started.
    pub fn requests(&self) -> MessageCounts {
        self.kernel.messages_sent()
    }

    /// How many destinations are draining now.
    pub fn draining(&self) -> usize {
        self.draining.len()
    }
}

/// One IPVS request planned for an op.
struct Planned {
    op: usize,
    command: OpCommand,
}

impl<K: IpvsKernel> IpvsDataplane<K> {
    /// Phase 0: ops on excluded addresses are recorded as asked, never programmed. Returns the
    /// indices of the others.
    fn set_aside_excluded(&mut self, ops: &[Op]) -> Vec<usize> {
        let mut live = Vec::with_capacity(ops.len());
        let mut excluded = Vec::new();
        for (index, op) in ops.iter().enumerate() {
            if !self.is_excluded(op.service().address) {
                live.push(index);
                continue;
            }
            if let Op::AddService { key, .. } = op {
                tracing::warn!(
                    service = %format_key(key),
                    "inside --ipvs-exclude-cidrs: not programmed"
                );
            }
            excluded.push(op.clone());
        }
        // Ops that make no sense here (a destination of a service never asked for) are dropped.
        let _ = apply_to(&mut self.excluded, &excluded);
        live
    }

    /// Phase 1: records ownership (and node-local destinations, for hairpin) before anything is
    /// created. On failure nothing may be created (a restart would not know it), so every op
    /// fails.
    fn record_ownership(&mut self, ops: &[Op], live: &[usize]) -> Result<(), DataplaneError> {
        let recorded = commands::records_to_add(ops, live, &self.owned);
        if recorded.services.is_empty()
            && recorded.destinations.is_empty()
            && recorded.source_ranges.is_empty()
        {
            return Ok(());
        }
        // Full before/after states: derived elements (VIPs, hairpin) shared by several
        // services are then kept or dropped correctly by the nft module.
        let mut next = self.owned.clone();
        next.services.extend(recorded.services);
        next.destinations.extend(recorded.destinations);
        for (key, ranges) in recorded.source_ranges {
            if ranges.is_open() {
                next.source_ranges.remove(&key);
            } else {
                next.source_ranges.insert(key, ranges);
            }
        }
        if let Err(error) = self.kernel.nft_update(&self.owned, &next) {
            let reason = format!("recording ownership in nftables: {}", error_chain(&error));
            self.rules_current = false;
            return Err(DataplaneError::Apply {
                dataplane: NAME,
                failed: ops
                    .iter()
                    .map(|op| FailedOp {
                        op: op.clone(),
                        reason: reason.clone(),
                    })
                    .collect(),
            });
        }
        self.owned = next;
        Ok(())
    }

    /// Phase 2: binds the addresses new services need (first user of an address only).
    async fn bind_new_addresses(
        &mut self,
        ops: &[Op],
        live: &[usize],
        failed: &mut BTreeMap<usize, String>,
    ) {
        let mut new_addresses = Vec::new();
        for &index in live {
            if let Op::AddService { key, config } = &ops[index] {
                if binds_address(config.frontend) {
                    let users = self.address_users.entry(key.address).or_default();
                    *users += 1;
                    if *users == 1 {
                        new_addresses.push((index, key.address));
                    }
                }
            }
        }
        if new_addresses.is_empty() {
            return;
        }
        let elsewhere = match self.kernel.addresses_elsewhere().await {
            Ok(elsewhere) => elsewhere,
            Err(error) => {
                let reason = format!("listing node addresses: {}", error_chain(&error));
                for (index, _) in new_addresses {
                    failed.insert(index, reason.clone());
                }
                return;
            }
        };
        let kernel = &self.kernel;
        // Requests in flight together: a cold sync binds thousands of VIPs.
        let results: Vec<(usize, IpAddr, Result<(), LinkError>)> = futures::stream::iter(
            new_addresses
                .into_iter()
                .filter(|(_, address)| !elsewhere.contains(address)),
        )
        .map(|(index, address)| async move { (index, address, kernel.add_address(address).await) })
        .buffer_unordered(ADDRESS_REQUESTS_IN_FLIGHT)
        .collect()
        .await;
        for (index, address, result) in results {
            if let Err(error) = result {
                failed.insert(
                    index,
                    format!(
                        "binding {address} on {}: {}",
                        self.settings.link_name,
                        error_chain(&error)
                    ),
                );
            }
        }
    }

    /// Phase 3: the IPVS requests, pipelined, then the refused ones retried in their other
    /// form. Returns the requests that took effect.
    fn program_ipvs(
        &mut self,
        ops: &[Op],
        live: &[usize],
        failed: &mut BTreeMap<usize, String>,
        now: Instant,
    ) -> Vec<Planned> {
        let planned: Vec<Planned> = commands::kernel_order(ops, live)
            .into_iter()
            .filter(|index| !failed.contains_key(index))
            .map(|index| Planned {
                op: index,
                command: commands::commands_for(&ops[index], &mut self.draining, now),
            })
            .collect();
        let requests: Vec<Command> = planned.iter().map(|p| p.command.command.clone()).collect();
        let results = self.kernel.execute(&requests);
        let mut retries = Vec::new();
        let mut succeeded = Vec::with_capacity(planned.len());
        for (planned, result) in planned.into_iter().zip(results) {
            let Err(error) = result else {
                succeeded.push(planned);
                continue;
            };
            let removing = matches!(ops[planned.op], Op::DeleteDestination { .. });
            match commands::retry_for(&planned.command.command, &error, removing) {
                Retry::Done => succeeded.push(planned),
                Retry::With(command) => retries.push((planned, command)),
                Retry::Fail => {
                    failed.insert(planned.op, error_chain(&error));
                }
            }
        }
        if !retries.is_empty() {
            let requests: Vec<Command> = retries.iter().map(|(_, c)| c.clone()).collect();
            for ((planned, _), result) in retries.into_iter().zip(self.kernel.execute(&requests)) {
                match result {
                    Ok(()) => succeeded.push(planned),
                    Err(error) => {
                        failed.insert(planned.op, error_chain(&error));
                    }
                }
            }
        }
        succeeded
    }

    /// Phase 4: conntrack clean-up for destinations deleted at once (one table dump per
    /// family).
    fn flush_conntrack(&mut self, succeeded: &[Planned], failed: &mut BTreeMap<usize, String>) {
        let flushes: Vec<(usize, BackendFlow)> = succeeded
            .iter()
            .filter_map(|planned| match planned.command.after {
                AfterSuccess::FlushConntrack {
                    service,
                    address,
                    port,
                } => Some((
                    planned.op,
                    BackendFlow {
                        protocol: service.protocol,
                        vip: Some(SocketAddr::new(service.address, service.port)),
                        backend: SocketAddr::new(address, port),
                    },
                )),
                AfterSuccess::Nothing => None,
            })
            .collect();
        if flushes.is_empty() {
            return;
        }
        let flows: Vec<BackendFlow> = flushes.iter().map(|(_, flow)| *flow).collect();
        match self.kernel.flush_conntrack(&flows) {
            Ok(flushed) => tracing::debug!(
                backends = flows.len(),
                flushed,
                "flushed conntrack entries of removed UDP/SCTP backends"
            ),
            Err(error) => {
                let reason = format!("flushing conntrack entries: {}", error_chain(&error));
                for (index, _) in flushes {
                    failed.insert(index, reason.clone());
                }
            }
        }
    }

    /// Phase 5: forgets what is gone: ownership records after the removal, then addresses no
    /// service needs any more.
    async fn forget_and_unbind(
        &mut self,
        ops: &[Op],
        live: &[usize],
        failed: &BTreeMap<usize, String>,
    ) {
        let forgotten = commands::records_to_forget(ops, live, failed, &self.owned);
        let mut released = Vec::new();
        for (key, (frontend, _)) in &forgotten.services {
            if !binds_address(*frontend) {
                continue;
            }
            if let Some(users) = self.address_users.get_mut(&key.address) {
                *users = users.saturating_sub(1);
                if *users == 0 {
                    self.address_users.remove(&key.address);
                    released.push(key.address);
                }
            }
        }
        if !forgotten.services.is_empty() || !forgotten.destinations.is_empty() {
            let mut next = self.owned.clone();
            for key in forgotten.services.keys() {
                next.services.remove(key);
                next.source_ranges.remove(key);
            }
            for destination in &forgotten.destinations {
                next.destinations.remove(destination);
            }
            match self.kernel.nft_update(&self.owned, &next) {
                Ok(()) => self.owned = next,
                Err(error) => {
                    // Records of services that are gone only keep them owned a little longer;
                    // the next read rewrites the table from what nft really holds.
                    self.rules_current = false;
                    tracing::warn!(
                        error = %error_chain(&error),
                        "could not clear the nftables records of removed services"
                    );
                }
            }
        }
        for address in released {
            if let Err(error) = self.kernel.delete_address(address).await {
                tracing::warn!(%address, error = %error_chain(&error), "could not unbind a VIP");
            }
        }
    }
}

impl<K: IpvsKernel> Dataplane for IpvsDataplane<K> {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            marks_local_destinations: true,
            ..Capabilities::default()
        }
    }

    fn name(&self) -> &'static str {
        NAME
    }

    async fn read(&mut self) -> Result<ProgrammedTable, DataplaneError> {
        for problem in self.check_drains(true, Instant::now()) {
            tracing::warn!("{problem}");
        }
        self.read_owned().await
    }

    async fn apply(&mut self, ops: &[Op]) -> Result<(), DataplaneError> {
        let mut failed: BTreeMap<usize, String> = BTreeMap::new();
        let now = Instant::now();
        let live = self.set_aside_excluded(ops);
        let mut phases = PhaseTimer::new();
        self.record_ownership(ops, &live)?;
        phases.lap("nft_record");
        self.bind_new_addresses(ops, &live, &mut failed).await;
        phases.lap("bind_addresses");
        let succeeded = self.program_ipvs(ops, &live, &mut failed, now);
        phases.lap("ipvs");
        self.flush_conntrack(&succeeded, &mut failed);
        phases.lap("conntrack");
        self.forget_and_unbind(ops, &live, &failed).await;
        phases.lap("nft_forget_and_unbind");
        for problem in self.check_drains(false, Instant::now()) {
            tracing::warn!("{problem}");
        }
        phases.lap("drain_check");
        phases.report("apply", ops.len());

        if failed.is_empty() {
            Ok(())
        } else {
            Err(DataplaneError::apply_failures(NAME, ops, failed))
        }
    }

    async fn refresh_node_addresses(&mut self) -> Option<Result<BTreeSet<IpAddr>, DataplaneError>> {
        Some(self.record_node_addresses().await)
    }

    async fn synced(&mut self) -> Result<(), DataplaneError> {
        self.unbind_unneeded()
            .await
            .map_err(|error| DataplaneError::finish(NAME, error))
    }

    /// IPVS keeps its own per-service counters (`ipvsadm -Ln --stats`); the agent reports only
    /// its requests.
    fn telemetry(&mut self, _read: TelemetryRead) -> Telemetry {
        let counts = self.kernel.messages_sent();
        let kernel_requests = vec![
            ("new_service", counts.new_service),
            ("set_service", counts.set_service),
            ("del_service", counts.del_service),
            ("new_destination", counts.new_destination),
            ("set_destination", counts.set_destination),
            ("del_destination", counts.del_destination),
            ("get_service", counts.get_service),
            ("dump_services", counts.dump_services),
            ("dump_destinations", counts.dump_destinations),
            ("other", counts.other),
        ];
        Telemetry {
            kernel_requests,
            traffic: Vec::new(),
        }
    }
}

/// Where a slow apply spent its time, logged so an operator can tell nft from IPVS from
/// rtnetlink when a large sync takes long.
struct PhaseTimer {
    started: Instant,
    last: Instant,
    laps: Vec<(&'static str, Duration)>,
}

impl PhaseTimer {
    /// Applies shorter than this are not worth a log line.
    const SLOW: Duration = Duration::from_secs(1);

    fn new() -> Self {
        let now = Instant::now();
        Self {
            started: now,
            last: now,
            laps: Vec::new(),
        }
    }

    fn lap(&mut self, phase: &'static str) {
        let now = Instant::now();
        self.laps.push((phase, now - self.last));
        self.last = now;
    }

    /// Logs the laps of a slow `what` (`apply`, `read`) of `items` ops or services.
    fn report(&self, what: &'static str, items: usize) {
        let total = self.started.elapsed();
        if total < Self::SLOW {
            return;
        }
        let phases: Vec<String> = self
            .laps
            .iter()
            .map(|(phase, took)| format!("{phase}={:.2}s", took.as_secs_f64()))
            .collect();
        tracing::info!(
            items,
            took = format!("{:.2}s", total.as_secs_f64()),
            phases = phases.join(" "),
            "slow IPVS {what}"
        );
    }
}

/// `TCP 10.96.0.10:53`, for logs.
pub fn format_key(key: &VsKey) -> String {
    format!(
        "{} {}",
        key.protocol,
        SocketAddr::new(key.address, key.port)
    )
}

#[cfg(test)]
#[path = "dataplane_tests.rs"]
mod tests;
