//! [`IpvsDataplane`]: the sync loop's [`Dataplane`] on IPVS, `kube-ipvs0` and nftables.
//!
//! Ownership: the nft table's sets are the record of which virtual services topoproxy owns.
//! They are written *before* a service is created and cleared *after* it is deleted, so a crash
//! at any point leaves no IPVS service of ours unrecorded, and a restart adopts exactly what it
//! owns. Every other IPVS service is foreign and never touched, and so is anything inside
//! `--ipvs-exclude-cidrs`.
//! A read forgets a record only when two reads agree that its service is gone: the service
//! dump can skip services ([`records`] says when and why).
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
    error_chain, Dataplane, DataplaneError, DestinationState, FailedOp, ProgrammedService,
    ProgrammedTable, ServiceConfig, TierShares,
};
use crate::scheduler::Scheduler;
use crate::table::{Frontend, TrafficPolicy, VsKey};

use super::commands::{
    self, binds_address, is_not_found, service_id, AfterSuccess, OpCommand, Retry,
};
use super::conntrack::{self, BackendFlow};
use super::drain::{self, DrainKey, DrainVerdict, Draining};
use super::link::{DummyLink, LinkError, DUMMY_LINK};
use super::netlink::{Command, IpvsClient, IpvsError, IpvsService, IpvsTimeouts, MessageCounts};
use super::nft::render::Hairpin;
use super::nft::{Nft, NftError, NftSettings, NftState};
use super::records::{self, Probe};
use super::sysctl::{self, SysctlError, Sysctls};

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

/// The IPVS dataplane.
pub struct IpvsDataplane {
    settings: IpvsSettings,
    ipvs: IpvsClient,
    link: DummyLink,
    nft: Nft,
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
    /// records are kept until the next read agrees ([`records`]).
    suspect_records: BTreeSet<VsKey>,
    draining: Draining,
    last_drain_check: Option<Instant>,
}

impl IpvsDataplane {
    /// Sets the kernel parameters, opens IPVS, and makes sure the dummy link exists. Nothing
    /// is programmed or removed until the sync loop reads and applies.
    pub async fn new(settings: IpvsSettings) -> Result<Self, IpvsSetupError> {
        let kernel = sysctl::kernel_release().unwrap_or(None);
        Sysctls::proc().ensure_all(&sysctl::ipvs_sysctls(settings.strict_arp, kernel))?;
        let mut ipvs = IpvsClient::connect()?;
        // kube-proxy's proxier does this only when one of the three is set; a 0 among them
        // leaves that timeout as the kernel has it.
        if !settings.timeouts.is_unset() {
            ipvs.set_timeouts(&settings.timeouts)
                .map_err(IpvsSetupError::Timeouts)?;
            tracing::info!(
                tcp = settings.timeouts.tcp,
                tcp_fin = settings.timeouts.tcp_fin,
                udp = settings.timeouts.udp,
                "IPVS connection timeouts set (seconds; 0 left as it was)"
            );
        }
        let link = DummyLink::ensure(&settings.link_name)
            .await
            .map_err(|source| IpvsSetupError::Link {
                name: settings.link_name.clone(),
                source: Box::new(source),
            })?;
        let nft = Nft::new()?;
        Ok(Self {
            settings,
            ipvs,
            link,
            nft,
            owned: NftState::default(),
            rules_current: false,
            excluded: BTreeMap::new(),
            address_users: BTreeMap::new(),
            node_addresses: None,
            unneeded_addresses: BTreeSet::new(),
            suspect_records: BTreeSet::new(),
            draining: Draining::new(),
            last_drain_check: None,
        })
    }

    fn is_excluded(&self, address: IpAddr) -> bool {
        self.settings
            .exclude_cidrs
            .iter()
            .any(|cidr| cidr.contains(address))
    }

    fn read_error(
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> DataplaneError {
        DataplaneError::read(NAME, source)
    }

    /// Reads the owned part of the kernel's table, re-creating the nft table when it is missing
    /// and rewriting it once per process (settings may have changed), with the hairpin
    /// elements of the destinations IPVS holds.
    async fn read_owned(&mut self) -> Result<ProgrammedTable, DataplaneError> {
        let mut phases = PhaseTimer::new();
        let rewrite = !self.rules_current;
        if self.rules_current {
            // Listing a table of 10,000 services costs seconds: while every nft write since
            // the last full read succeeded, our copy is the table, so only check it is there.
            let exists = self.nft.exists().map_err(Self::read_error)?;
            if !exists {
                tracing::warn!("the nftables table inet topoproxy vanished; re-creating it");
                self.nft
                    .replace(&self.settings.nft, &self.owned)
                    .map_err(Self::read_error)?;
            }
        }
        // Which destinations are node-local: on a full read what the hairpin set held, else
        // our copy of it.
        let listed_hairpins = if rewrite {
            let listed = self
                .nft
                .read()
                .map_err(Self::read_error)?
                .unwrap_or_default();
            self.owned = listed.state;
            // The destinations come from the IPVS dump below; the table is rewritten after it.
            self.owned.destinations.clear();
            if let Some(addresses) = &self.node_addresses {
                self.owned.node_addresses = addresses.clone();
            }
            Some(listed.hairpins)
        } else {
            None
        };

        phases.lap("nft");
        let services = self.ipvs.services().map_err(Self::read_error)?;
        phases.lap("ipvs_services");
        let mut table = ProgrammedTable::new();
        let mut listed = BTreeSet::new();
        for service in services {
            let key = VsKey::new(service.id.protocol, service.id.address, service.id.port);
            let Some(&role) = self.owned.services.get(&key) else {
                continue;
            };
            if self.is_excluded(key.address) {
                continue;
            }
            listed.insert(key);
            let programmed = self.read_service(key, role, service, listed_hairpins.as_ref())?;
            table.insert(key, programmed);
        }
        let probes = self.read_unlisted(&listed, &mut table, listed_hairpins.as_ref())?;
        for (key, service) in &self.excluded {
            table.insert(*key, service.clone());
        }

        phases.lap("ipvs_destinations");
        let forget = self.judge_records(&table, &listed, &probes);
        self.forget_records(&forget, rewrite)?;
        if rewrite {
            // Rewrites the rules too: they may come from an older version or other settings.
            self.nft
                .replace(&self.settings.nft, &self.owned)
                .map_err(Self::read_error)?;
            self.rules_current = true;
            phases.lap("nft_replace");
        }
        self.address_users.clear();
        for (key, (frontend, _)) in &self.owned.services {
            if binds_address(*frontend) && table.contains_key(key) {
                *self.address_users.entry(key.address).or_default() += 1;
            }
        }
        self.repair_addresses().await.map_err(Self::read_error)?;
        phases.lap("addresses");
        phases.report("read", table.len());
        Ok(table)
    }

    /// One owned service as the dataplane holds it, with its destinations (draining ones left
    /// out); on a full read, also notes which of them the hairpin set marks node-local.
    fn read_service(
        &mut self,
        key: VsKey,
        (frontend, traffic_policy): (Frontend, TrafficPolicy),
        service: IpvsService,
        hairpins: Option<&BTreeSet<Hairpin>>,
    ) -> Result<ProgrammedService, DataplaneError> {
        let destinations = self
            .ipvs
            .destinations(&service.id)
            .map_err(Self::read_error)?;
        if let Some(hairpins) = hairpins {
            self.owned.destinations.extend(
                destinations
                    .iter()
                    .filter(|d| hairpins.contains(&(d.address, key.protocol, d.port)))
                    .map(|d| (key, d.address, d.port)),
            );
        }
        let owned = &self.owned;
        let destinations = destinations
            .into_iter()
            .filter(|d| {
                !self.draining.contains(&DrainKey {
                    service: key,
                    address: d.address,
                    port: d.port,
                })
            })
            .map(|d| {
                let state = DestinationState {
                    local: owned.destinations.contains(&(key, d.address, d.port)),
                    ..DestinationState::active(d.weight)
                };
                ((d.address, d.port), state)
            })
            .collect();
        Ok(ProgrammedService {
            config: ServiceConfig {
                scheduler: Scheduler::from_kernel(&service.scheduler, service.scheduler_flags),
                persistence_timeout: service.persistence_timeout,
                frontend,
                traffic_policy,
                tier_shares: TierShares::default(),
                source_ranges: owned.source_ranges.get(&key).cloned().unwrap_or_default(),
            },
            destinations,
        })
    }

    /// Asks for each owned service the dump did not list by its key, and adds those the kernel
    /// has to `table`: the dump can skip services ([`IpvsClient::services`]), and a service read
    /// as absent would have its VIP unbound and be created again over the destinations it
    /// already has. Returns the answers, for [`judge_records`](Self::judge_records).
    fn read_unlisted(
        &mut self,
        listed: &BTreeSet<VsKey>,
        table: &mut ProgrammedTable,
        hairpins: Option<&BTreeSet<Hairpin>>,
    ) -> Result<BTreeMap<VsKey, Probe>, DataplaneError> {
        let unlisted: Vec<(VsKey, (Frontend, TrafficPolicy))> = self
            .owned
            .services
            .iter()
            .filter(|(key, _)| !listed.contains(key) && !self.is_excluded(key.address))
            .map(|(key, role)| (*key, *role))
            .collect();
        let mut probes = BTreeMap::new();
        for (key, role) in unlisted {
            match self.ipvs.service(&service_id(&key)) {
                Ok(Some(service)) => {
                    let programmed = self.read_service(key, role, service, hairpins)?;
                    table.insert(key, programmed);
                    probes.insert(key, Probe::Present);
                }
                Ok(None) => {
                    probes.insert(key, Probe::Absent);
                }
                // Without an answer the service is reported absent (re-creating one that
                // exists updates it) and its record waits for the next read's dump.
                Err(error) => tracing::warn!(
                    service = %format_key(&key),
                    error = %error_chain(&error),
                    "could not ask IPVS for a service its dump did not list"
                ),
            }
        }
        let skipped = probes.values().filter(|p| **p == Probe::Present).count();
        if skipped > 0 {
            tracing::info!(
                services = skipped,
                "the IPVS service dump skipped services of ours (another namespace changed its services meanwhile); read them one by one"
            );
        }
        Ok(probes)
    }

    /// The ownership records to forget after this read: those of services IPVS does not have
    /// (an agent killed between recording and creating a service, or between deleting it and
    /// clearing its record, leaves one; kept, it would claim whatever service another tool
    /// later creates at that address and port). A record is forgotten only when two reads agree
    /// that its service is gone, the dump and a GET, or two dumps in a row
    /// ([`records::judge_records`]). Records inside `--ipvs-exclude-cidrs` that no op asked for
    /// are forgotten as before, their services never being read.
    fn judge_records(
        &mut self,
        table: &ProgrammedTable,
        listed: &BTreeSet<VsKey>,
        probes: &BTreeMap<VsKey, Probe>,
    ) -> BTreeSet<VsKey> {
        let mut recorded = BTreeSet::new();
        let mut excluded = BTreeSet::new();
        for key in self.owned.services.keys() {
            if !self.is_excluded(key.address) {
                recorded.insert(*key);
            } else if !table.contains_key(key) {
                excluded.insert(*key);
            }
        }
        let verdict = records::judge_records(&recorded, listed, &self.suspect_records, probes);
        if !verdict.suspects.is_empty() {
            tracing::info!(
                records = verdict.suspects.len(),
                "the IPVS service dump missed recorded services and no GET answered for them; keeping their records until the next read"
            );
        }
        self.suspect_records = verdict.suspects;
        verdict.forget.union(&excluded).copied().collect()
    }

    /// Forgets the records of `stale` services. Written with the rewrite when one follows, else
    /// as an update of its own.
    fn forget_records(
        &mut self,
        stale: &BTreeSet<VsKey>,
        rewrite: bool,
    ) -> Result<(), DataplaneError> {
        if stale.is_empty() {
            return Ok(());
        }
        tracing::warn!(
            records = stale.len(),
            "forgetting ownership records of IPVS services that do not exist (left by an agent stopped between two writes)"
        );
        let recorded = (!rewrite).then(|| self.owned.clone());
        self.owned.services.retain(|key, _| !stale.contains(key));
        self.owned
            .source_ranges
            .retain(|key, _| !stale.contains(key));
        self.owned
            .destinations
            .retain(|(key, _, _)| !stale.contains(key));
        if let Some(recorded) = recorded {
            if let Err(error) = self.nft.update(&recorded, &self.owned) {
                self.rules_current = false;
                return Err(Self::read_error(error));
            }
        }
        Ok(())
    }

    /// Binds every address an owned service needs, and marks the dummy link's others for
    /// unbinding at the end of the sync.
    async fn repair_addresses(&mut self) -> Result<(), LinkError> {
        let bound = self.link.addresses().await?;
        let needed: BTreeSet<IpAddr> = self.address_users.keys().copied().collect();
        let missing: Vec<IpAddr> = needed.difference(&bound).copied().collect();
        if !missing.is_empty() {
            let elsewhere = self.link.addresses_elsewhere().await?;
            for address in missing {
                if !elsewhere.contains(&address) {
                    self.link.add_address(address).await?;
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
            .link
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
            if let Err(error) = self.nft.update(&self.owned, &next) {
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
                self.link.delete_address(address).await?;
            }
        }
        Ok(())
    }

    /// Deletes draining destinations that have no connections left or ran out of time.
    fn check_drains(&mut self, force: bool) -> Vec<String> {
        let now = Instant::now();
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
            let connections: BTreeMap<(IpAddr, u16), u64> =
                match self.ipvs.destinations(&service_id(&service)) {
                    Ok(list) => list
                        .into_iter()
                        .map(|d| {
                            (
                                (d.address, d.port),
                                u64::from(d.active_connections) + u64::from(d.inactive_connections),
                            )
                        })
                        .collect(),
                    Err(error) if is_not_found(&error) => {
                        self.draining.forget_service(&service);
                        continue;
                    }
                    Err(error) => {
                        problems.push(format!(
                            "checking draining destinations: {}",
                            error_chain(&error)
                        ));
                        continue;
                    }
                };
            for key in self.draining.of_service(&service).collect::<Vec<_>>() {
                let Some(&count) = connections.get(&(key.address, key.port)) else {
                    self.draining.cancel(&key);
                    continue;
                };
                let since = self.draining.since(&key).unwrap_or(now);
                match drain::verdict(since, now, self.settings.drain_timeout, count) {
                    DrainVerdict::Keep => {}
                    verdict => {
                        if verdict == DrainVerdict::TimedOut {
                            tracing::warn!(
                                service = %format_key(&key.service),
                                destination = %SocketAddr::new(key.address, key.port),
                                connections = count,
                                "drain timeout passed; deleting the destination with connections open"
                            );
                        }
                        deletions.push(key);
                    }
                }
            }
        }
        if deletions.is_empty() {
            return problems;
        }
        let commands: Vec<Command> = deletions
            .iter()
            .map(|key| Command::DelDestination(service_id(&key.service), key.address, key.port))
            .collect();
        for (key, result) in deletions.iter().zip(self.ipvs.execute(&commands)) {
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
        self.ipvs.messages_sent()
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

impl IpvsDataplane {
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
        if let Err(error) = self.nft.update(&self.owned, &next) {
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
        let elsewhere = match self.link.addresses_elsewhere().await {
            Ok(elsewhere) => elsewhere,
            Err(error) => {
                let reason = format!("listing node addresses: {}", error_chain(&error));
                for (index, _) in new_addresses {
                    failed.insert(index, reason.clone());
                }
                return;
            }
        };
        let link = &self.link;
        // Requests in flight together: a cold sync binds thousands of VIPs.
        let results: Vec<(usize, IpAddr, Result<(), LinkError>)> = futures::stream::iter(
            new_addresses
                .into_iter()
                .filter(|(_, address)| !elsewhere.contains(address)),
        )
        .map(|(index, address)| async move { (index, address, link.add_address(address).await) })
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
        let results = self.ipvs.execute(&requests);
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
            for ((planned, _), result) in retries.into_iter().zip(self.ipvs.execute(&requests)) {
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
    fn flush_conntrack(succeeded: &[Planned], failed: &mut BTreeMap<usize, String>) {
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
        match conntrack::flush(&flows) {
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
            match self.nft.update(&self.owned, &next) {
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
            if let Err(error) = self.link.delete_address(address).await {
                tracing::warn!(%address, error = %error_chain(&error), "could not unbind a VIP");
            }
        }
    }
}

impl Dataplane for IpvsDataplane {
    fn marks_local_destinations(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        NAME
    }

    async fn read(&mut self) -> Result<ProgrammedTable, DataplaneError> {
        for problem in self.check_drains(true) {
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
        Self::flush_conntrack(&succeeded, &mut failed);
        phases.lap("conntrack");
        self.forget_and_unbind(ops, &live, &failed).await;
        phases.lap("nft_forget_and_unbind");
        for problem in self.check_drains(false) {
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
        self.unbind_unneeded().await.map_err(Self::read_error)
    }

    fn kernel_requests(&self) -> Vec<(&'static str, u64)> {
        let counts = self.ipvs.messages_sent();
        vec![
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
        ]
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
