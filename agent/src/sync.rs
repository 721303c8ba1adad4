//! The sync loop: source events in, dataplane changes out.
//!
//! `wait (event | timer) → re-plan dirty Services → diff → apply → record`. Nothing is
//! programmed until Services, EndpointSlices and this node's Node are known; after that each
//! event marks the Services it touches dirty, and at most every `min_sync_period` only those are
//! re-planned and diffed. Every `sync_period` the dataplane's actual state is read back and any
//! drift repaired. Trouble never flushes: a source that goes quiet leaves the table as it was,
//! a dataplane that fails is retried with backoff, and health and metrics say so.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};

use crate::dataplane::op::Op;
use crate::dataplane::{
    error_chain, Dataplane, DataplaneError, ProgrammedTable, ServiceTraffic, TelemetryRead,
};
use crate::diff::OpBatch;
use crate::healthcheck::{self, HealthCheck, HealthCheckServers};
use crate::metrics::SyncPhase;
use crate::mirror::{Mirror, Planned};
use crate::model::{LocalityPolicy, Node, NodeLocality, ServiceKey};
use crate::planner::{plan, planned_servers, PlanConfig};
use crate::source::{Resource, SourceEvent};
use crate::state::AgentState;
use crate::store::Store;
use crate::table::{Conflict, NodeTable, VirtualServer, VsKey};

/// Timing and planning settings of the loop.
#[derive(Debug, Clone)]
pub struct SyncSettings {
    pub min_sync_period: Duration,
    pub sync_period: Duration,
    pub plan: PlanConfig,
}

/// Why the loop stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("every source closed its event channel")]
    SourcesClosed,
}

/// Longest wait between retries after a failed sync.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(30);
const FIRST_RETRY_BACKOFF: Duration = Duration::from_millis(500);

/// The loop's state; see the module docs.
pub struct SyncLoop<D> {
    settings: SyncSettings,
    node_name: String,
    dataplane: D,
    state: Arc<AgentState>,
    store: Store,
    node: Option<Node>,
    listed: HashSet<Resource>,
    /// What the dataplane holds, as far as this loop knows: the plan, but where it may differ.
    mirror: Mirror,
    /// Whether `mirror` is exactly what the last sync left programmed: false until the first
    /// successful sync and after a failed one. Drift is measured only against a trusted mirror.
    mirror_trusted: bool,
    dirty: HashSet<ServiceKey>,
    replan_all: bool,
    /// Read the dataplane back and repair drift at the next sync.
    resync: bool,
    initial_sync_done: bool,
    falling_back: HashSet<ServiceKey>,
    last_attempt: Option<Instant>,
    retry_backoff: Option<Duration>,
    next_resync: Instant,
    health_checks: HealthCheckServers,
    /// Address:port claims two Services make, already warned about.
    known_conflicts: BTreeSet<ConflictId>,
    /// Firewalled load-balancer frontends the dataplane cannot enforce, already warned about.
    withheld: BTreeSet<VsKey>,
    /// Whether `withheld` is the table's as of the last sync: false until the first look and
    /// after a look skipped because the dataplane enforced source ranges then.
    withheld_current: bool,
    /// The health checks the store asks for, kept up to date from the Services that change.
    health_desired: BTreeMap<ServiceKey, HealthCheck>,
    /// What was re-planned since the post-sync work last looked.
    replanned: Replanned,
    /// When the oldest change not yet synced reached the loop (after the initial sync).
    pending_since: Option<Instant>,
}

/// What the sync loop re-planned since its post-sync work (the withheld frontends, the
/// health checks) last looked, so that work follows what changed instead of walking every
/// virtual server and every Service after each sync, however small.
#[derive(Debug)]
enum Replanned {
    /// Everything: a full plan (the first sync, a node change), or nothing looked at yet.
    All,
    /// Only these: the table holds what it held at every other key, and the store's other
    /// Services and their slices are unchanged.
    Some {
        keys: BTreeSet<VsKey>,
        services: Vec<ServiceKey>,
    },
}

impl Replanned {
    fn nothing() -> Self {
        Self::Some {
            keys: BTreeSet::new(),
            services: Vec::new(),
        }
    }

    /// Adds a partial re-plan: the keys whose plan it may have changed, the Services it
    /// re-planned.
    fn add(&mut self, replanned_keys: &BTreeSet<VsKey>, replanned_services: Vec<ServiceKey>) {
        if let Self::Some { keys, services } = self {
            keys.extend(replanned_keys.iter().copied());
            services.extend(replanned_services);
        }
    }
}

impl<D: Dataplane> SyncLoop<D> {
    pub fn new(settings: SyncSettings, dataplane: D, state: Arc<AgentState>) -> Self {
        let node_name = state.node_name.clone();
        let next_resync = Instant::now() + settings.sync_period;
        let health_checks = HealthCheckServers::new(Arc::clone(&state));
        let loop_ = Self {
            settings,
            node_name,
            dataplane,
            state,
            store: Store::new(),
            node: None,
            listed: HashSet::new(),
            mirror: Mirror::new(),
            mirror_trusted: false,
            dirty: HashSet::new(),
            replan_all: false,
            resync: true,
            initial_sync_done: false,
            falling_back: HashSet::new(),
            last_attempt: None,
            retry_backoff: None,
            next_resync,
            health_checks,
            known_conflicts: BTreeSet::new(),
            withheld: BTreeSet::new(),
            withheld_current: false,
            health_desired: BTreeMap::new(),
            replanned: Replanned::All,
            pending_since: None,
        };
        loop_.report_waiting();
        loop_
    }

    /// Runs until `shutdown` completes or every source is gone.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<SourceEvent>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), SyncError> {
        tokio::pin!(shutdown);
        loop {
            let wake_at = self.wake_at();
            tokio::select! {
                biased;
                () = &mut shutdown => return Ok(()),
                event = events.recv() => {
                    let Some(event) = event else {
                        return Err(SyncError::SourcesClosed);
                    };
                    self.handle(event);
                    // Take everything already queued so one sync covers the whole burst.
                    while let Ok(event) = events.try_recv() {
                        self.handle(event);
                    }
                }
                () = sleep_until_opt(wake_at) => self.sync().await,
            }
        }
    }

    fn ready(&self) -> bool {
        self.node.is_some()
            && self
                .gating_resources()
                .iter()
                .all(|resource| self.listed.contains(resource))
    }

    /// The lists that must be complete before anything is programmed: with a cluster id also
    /// the MCS ones (a source reports a missing ServiceImport CRD as an empty list), so a
    /// restart does not withdraw clusterset IPs for a moment.
    fn gating_resources(&self) -> Vec<Resource> {
        let mut resources = vec![Resource::Services, Resource::EndpointSlices];
        if self.settings.plan.cluster_id.is_some() {
            resources.extend([Resource::ServiceImports, Resource::ImportedSlices]);
        }
        resources
    }

    fn has_work(&self) -> bool {
        !self.initial_sync_done || self.replan_all || self.resync || !self.dirty.is_empty()
    }

    fn wake_at(&self) -> Option<Instant> {
        if !self.ready() {
            return None;
        }
        let now = Instant::now();
        let at = if self.has_work() {
            let gap = self
                .retry_backoff
                .unwrap_or_default()
                .max(self.settings.min_sync_period);
            self.last_attempt
                .map_or(now, |last| (last + gap).max(now))
                .min(self.next_resync.max(now))
        } else {
            self.next_resync
        };
        Some(at)
    }

    /// Applies one source event to the store and marks what it touches.
    pub fn handle(&mut self, event: SourceEvent) {
        match event {
            SourceEvent::Service(key, Some(service)) => {
                if self.store.service(&key) != Some(&service) {
                    self.store.upsert_service(service);
                    self.mark_dirty(key);
                }
            }
            SourceEvent::Service(key, None) => {
                if self.store.remove_service(&key).is_some() {
                    self.mark_dirty(key);
                }
            }
            SourceEvent::Slice(key, Some(slice)) => {
                if self.store.slice(&key) != Some(&slice) {
                    for affected in self.store.upsert_slice(slice) {
                        self.mark_dirty(affected);
                    }
                }
            }
            SourceEvent::Slice(key, None) => {
                if let Some(owner) = self.store.remove_slice(&key) {
                    self.mark_dirty(owner);
                }
            }
            SourceEvent::Node(Some(node)) => self.own_node_changed(node),
            SourceEvent::Node(None) => {
                // Keep planning with what we knew: flushing would cut every Service on the node.
                tracing::warn!(
                    node = %self.node_name,
                    "this node's Node object was deleted; keeping the last known topology"
                );
            }
            SourceEvent::NodeLocality(name, locality) => {
                self.node_locality_changed(&name, locality)
            }
            SourceEvent::Listed(resource) => {
                if self.listed.insert(resource) {
                    tracing::info!(resource = resource.as_str(), "initial list complete");
                    if self.initial_sync_done {
                        // A list the first sync did not wait for (every Node's locality, at
                        // thousands of Nodes) leaves its decoded pages as garbage too, after
                        // the trim that followed that sync.
                        crate::heap::release_free_memory();
                    }
                }
                self.report_waiting();
            }
        }
    }

    /// This agent's own Node: its addresses, zone and whether it is leaving.
    fn own_node_changed(&mut self, mut node: Node) {
        if node.name != self.node_name {
            tracing::debug!(node = %node.name, "ignoring another node's object");
            return;
        }
        if node.leaving != self.node.as_ref().and_then(|n| n.leaving.clone()) {
            tracing::info!(leaving = ?node.leaving, "this node's eligibility for load balancers changed");
        }
        self.state.health.set_node_leaving(node.leaving.clone());
        // The host's addresses are the agent's own reading, not the object's.
        node.local_addresses = self.node.as_ref().and_then(|n| n.local_addresses.clone());
        // Only topology and addresses matter to the plan.
        let replan = self.node.as_ref().map(Node::topology) != Some(node.topology());
        if replan && self.node.is_some() {
            tracing::info!(
                zone = ?node.zone,
                addresses = ?node.addresses,
                "this node's topology or addresses changed; re-planning everything"
            );
        }
        self.node = Some(node);
        if replan {
            self.replan_all = true;
            self.note_pending_change();
        }
        self.listed.insert(Resource::Node);
        self.report_waiting();
    }

    /// Another Node's zone and region, which only the locality policies' tiers read.
    fn node_locality_changed(&mut self, name: &str, locality: Option<NodeLocality>) {
        let changed = match locality {
            Some(locality) => self.store.upsert_node_locality(name, locality),
            None => self.store.remove_node_locality(name),
        };
        // Zones, regions and node counts feed only the locality policies' tiers.
        let in_use = self.settings.plan.default_locality != LocalityPolicy::KubeProxy
            || self.store.has_locality_services();
        if changed && in_use {
            self.replan_all = true;
            self.note_pending_change();
        }
    }

    fn mark_dirty(&mut self, key: ServiceKey) {
        self.dirty.insert(key);
        self.note_pending_change();
    }

    fn note_pending_change(&mut self) {
        if self.initial_sync_done {
            self.state.health.record_pending_change(SystemTime::now());
            self.pending_since.get_or_insert_with(Instant::now);
        }
    }

    fn report_waiting(&self) {
        let mut waiting = Vec::new();
        for resource in self.gating_resources() {
            if !self.listed.contains(&resource) {
                waiting.push(resource.as_str().to_owned());
            }
        }
        if self.node.is_none() {
            waiting.push(format!("node {}", self.node_name));
        }
        self.state.health.set_waiting_for(waiting);
    }

    /// One sync: re-plan what is dirty (everything the first time or after a node change),
    /// read the dataplane back when a resync is due, diff, apply, record.
    pub async fn sync(&mut self) {
        self.refresh_node_addresses().await;
        let Some(node) = self.node.clone() else {
            return;
        };
        let started = Instant::now();
        if let Some(since) = self.pending_since.take() {
            self.observe_phase(SyncPhase::Wait, started.saturating_duration_since(since));
        }
        self.last_attempt = Some(started);
        if started >= self.next_resync {
            self.resync = true;
            self.next_resync = started + self.settings.sync_period;
        }
        let ops = match self.plan_ops(&node).await {
            Ok(ops) => ops,
            Err(error) => {
                self.fail(started, &error);
                return;
            }
        };
        let applying = Instant::now();
        let applied = self.apply(&ops).await;
        let finishing = Instant::now();
        self.observe_phase(SyncPhase::Apply, finishing - applying);
        match applied {
            Ok(()) => self.record_success(started, ops.len()).await,
            Err(error) => self.fail(started, &error),
        }
        let post_sync = Instant::now();
        self.observe_phase(SyncPhase::Finish, post_sync - finishing);
        self.publish_table_stats();
        let replanned = std::mem::replace(&mut self.replanned, Replanned::nothing());
        self.warn_withheld(&replanned);
        self.sync_health_checks(&replanned);
        self.observe_phase(SyncPhase::PostSync, post_sync.elapsed());
    }

    fn observe_phase(&self, phase: SyncPhase, duration: Duration) {
        self.state.metrics.observe_sync_phase(phase, duration);
    }

    /// Reads the node's own addresses from the dataplane's host; a change re-plans every
    /// Service, as NodePorts follow the addresses (kube-proxy reads them on every sync too).
    async fn refresh_node_addresses(&mut self) {
        let Some(result) = self.dataplane.refresh_node_addresses().await else {
            return;
        };
        let addresses = match result {
            Ok(addresses) => addresses,
            Err(error) => {
                tracing::warn!(
                    error = %error_chain(&error),
                    "reading the node's addresses failed; NodePorts stay where they are"
                );
                return;
            }
        };
        let Some(node) = self.node.as_mut() else {
            return;
        };
        if node.local_addresses.as_ref() == Some(&addresses) {
            return;
        }
        if node.local_addresses.is_some() {
            tracing::info!(
                ?addresses,
                "this node's own addresses changed; re-planning everything"
            );
        }
        node.local_addresses = Some(addresses);
        self.replan_all = true;
    }

    /// The changes this sync makes: re-plans what is dirty and diffs it against the mirror, or,
    /// when a resync is due, reads the dataplane back first (counting drift) and diffs the
    /// whole plan against what it holds.
    async fn plan_ops(&mut self, node: &Node) -> Result<Vec<Op>, DataplaneError> {
        let planning = Instant::now();
        let full = self.replan_all || !self.initial_sync_done;
        if !self.resync {
            let keys = self.replan(node, full, true);
            let diffing = Instant::now();
            self.observe_phase(SyncPhase::Plan, diffing - planning);
            let ops = if full {
                self.diff_all()
            } else {
                self.diff_keys(&keys)
            };
            self.observe_phase(SyncPhase::Diff, diffing.elapsed());
            return Ok(ops);
        }
        let (actual, drift) = self.read_back().await?;
        if drift > 0 {
            tracing::warn!(
                changes = drift,
                dataplane = self.dataplane.name(),
                "the dataplane drifted from what the agent programmed; repairing"
            );
            self.state.metrics.drift_repaired(drift as u64);
        }
        // Planned only now: pending changes are the agent's own, never drift. Nothing to pin:
        // the read replaces what the mirror held.
        self.replan(node, full, false);
        {
            let table = read_table(&self.state);
            let planned = planned(&table, &self.dataplane, &self.node_name);
            self.mirror.replace(actual, &planned);
        }
        let diffing = Instant::now();
        self.observe_phase(SyncPhase::Plan, diffing - planning);
        let ops = self.diff_all();
        self.observe_phase(SyncPhase::Diff, diffing.elapsed());
        Ok(ops)
    }

    /// Reads the dataplane back (and its traffic counters). Returns what it holds and the drift:
    /// how many changes would take it back to what this loop last programmed, measured before
    /// pending changes are planned, so they are never mistaken for another writer's.
    async fn read_back(&mut self) -> Result<(ProgrammedTable, usize), DataplaneError> {
        let read = self.dataplane.read().await;
        let traffic = self.record_telemetry(TelemetryRead::RequestsAndTraffic);
        if !traffic.is_empty() {
            self.state.metrics.record_service_traffic(&traffic);
            let served = served_by_tier_kind(&self.read_table(), &traffic);
            self.state.metrics.record_locality_served(&served);
        }
        let actual = read?;
        // Without a trusted mirror (before the first successful sync, or after a failed one)
        // there is nothing to measure against: this read becomes the new baseline.
        let drift = if self.mirror_trusted {
            let table = self.read_table();
            self.mirror
                .drift(&actual, &planned(&table, &self.dataplane, &self.node_name))
        } else {
            0
        };
        Ok((actual, drift))
    }

    /// Records a sync whose `changes` were all applied.
    async fn record_success(&mut self, started: Instant, changes: usize) {
        // Not done until the dataplane finished it (eBPF: the map switch, the tc attach): a
        // failure is retried with backoff like a failed apply, not left to the next event or
        // the next resync.
        if let Err(error) = self.dataplane.synced().await {
            self.fail(started, &error);
            return;
        }
        if !self.initial_sync_done {
            // The kernel writes since the start (failed attempts included): what this
            // restart had to change, with the dataplane's own start and `synced`.
            tracing::info!(
                virtual_servers = self.read_table().len(),
                changes,
                kernel_writes = crate::kernel_writes::total(),
                elapsed = ?started.elapsed(),
                "initial sync done"
            );
        }
        // Before the sync is counted, so a successful sync's writes are all in the
        // metrics (the dataplane's start and `synced` write too, not only `apply`).
        self.record_telemetry(TelemetryRead::Requests);
        let first = !self.initial_sync_done;
        if self.resync {
            // Counted from the end: a read that takes longer than the period (10,000
            // services under emulation) must not start the next one at once.
            self.next_resync = Instant::now() + self.settings.sync_period;
        }
        self.initial_sync_done = true;
        self.mirror_trusted = true;
        self.replan_all = false;
        self.resync = false;
        self.retry_backoff = None;
        let now = SystemTime::now();
        self.state.health.record_sync_success(now);
        self.state.metrics.set_last_successful_sync(now);
        self.state.metrics.observe_sync(started.elapsed(), true);
        if first {
            self.store.compact_services();
            self.state
                .table
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .compact();
            // Every Service of the initial lists was dirty once; the set keeps its capacity.
            self.dirty.shrink_to_fit();
            crate::heap::release_free_memory();
        }
    }

    /// Opens, closes and updates the Services' health-check node ports (both proxy modes),
    /// looking again only at the Services re-planned since the last look: every Service the
    /// store's changes touched is dirty until a re-plan takes it, and a sync that fails
    /// before re-planning (a failed read) ends before this work.
    fn sync_health_checks(&mut self, replanned: &Replanned) {
        match replanned {
            Replanned::Some { services, .. } => healthcheck::update_desired(
                &mut self.health_desired,
                &self.store,
                services,
                &self.node_name,
                &self.settings.plan,
            ),
            Replanned::All => {
                self.health_desired =
                    healthcheck::desired(&self.store, &self.node_name, &self.settings.plan);
            }
        }
        // As kube-proxy: every address, unless --nodeport-addresses narrows the NodePorts.
        let addresses = match (&self.node, &self.settings.plan.node_port_addresses) {
            (Some(node), chosen) if !chosen.is_default() => Some(chosen.select(node)),
            _ => None,
        };
        self.health_checks.sync(&self.health_desired, addresses);
    }

    /// Where each Service's health check listens (for tests).
    pub fn health_check_ports(&self) -> std::collections::BTreeMap<ServiceKey, u16> {
        self.health_checks.ports()
    }

    fn fail(&mut self, started: Instant, error: &DataplaneError) {
        let error = error_chain(error);
        tracing::error!(%error, "sync failed; the dataplane keeps its last state, retrying");
        self.state.metrics.dataplane_error();
        self.state
            .health
            .record_sync_failure(SystemTime::now(), error);
        self.state.metrics.observe_sync(started.elapsed(), false);
        // We no longer know exactly what the dataplane holds: a failed op may have been half
        // done. So the next read is taken as it is, and what it finds is not counted as drift
        // (the rule `read_back` follows): drift is only measured against a trusted mirror.
        self.resync = true;
        self.mirror_trusted = false;
        self.retry_backoff = Some(
            self.retry_backoff
                .map_or(FIRST_RETRY_BACKOFF, |b| (b * 2).min(MAX_RETRY_BACKOFF)),
        );
    }

    fn read_table(&self) -> std::sync::RwLockReadGuard<'_, NodeTable> {
        read_table(&self.state)
    }

    /// Every change that turns what the dataplane holds into the whole plan.
    fn diff_all(&self) -> Vec<Op> {
        let table = self.read_table();
        self.mirror
            .diff_all(&planned(&table, &self.dataplane, &self.node_name))
    }

    /// Says once per key which firewalled load-balancer frontends this dataplane leaves out:
    /// looks at the keys re-planned since the last sync (at the whole table after a full plan
    /// or a skipped look).
    fn warn_withheld(&mut self, replanned: &Replanned) {
        if self.dataplane.capabilities().enforces_source_ranges {
            // `withheld` is not followed meanwhile: the next look walks the whole table.
            self.withheld_current = false;
            return;
        }
        let keys = match replanned {
            Replanned::Some { keys, .. } if self.withheld_current => Some(keys),
            _ => None,
        };
        let table = read_table(&self.state);
        for vs in update_withheld(&mut self.withheld, &table, keys) {
            tracing::warn!(
                service = %vs.service,
                "{} {}:{} has loadBalancerSourceRanges, which the {} dataplane does not \
                 enforce yet: not served on this node (closed rather than open to every source)",
                vs.key.protocol,
                vs.key.address,
                vs.key.port,
                self.dataplane.name()
            );
        }
        self.withheld_current = true;
    }

    /// Re-plans the dirty Services (or all of them) and returns the virtual-server keys whose
    /// desired state may have changed. With `pin`, the mirror first keeps what the dataplane
    /// holds at every key whose plan changes.
    fn replan(&mut self, node: &Node, full: bool, pin: bool) -> BTreeSet<VsKey> {
        let mut keys = BTreeSet::new();
        let dirty: Vec<ServiceKey> = self.dirty.drain().collect();
        let mut table = self
            .state
            .table
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if full {
            let replanned = plan(&self.store, node, &self.settings.plan);
            if pin {
                self.mirror.pin_replaced(
                    &planned(&table, &self.dataplane, &self.node_name),
                    &planned(&replanned, &self.dataplane, &self.node_name),
                );
            }
            *table = replanned;
            self.falling_back = table
                .servers()
                .filter(|vs| vs.is_falling_back())
                .map(|vs| vs.service.clone())
                .collect();
            self.known_conflicts = warn_new_conflicts(&table, &self.known_conflicts);
            self.state
                .metrics
                .set_address_conflicts(self.known_conflicts.len());
            self.replanned = Replanned::All;
            return keys;
        }
        for key in &dirty {
            keys.extend(table.claimed_keys(key).iter().copied());
        }
        for key in &dirty {
            let servers = planned_servers(&self.store, key, node, &self.settings.plan);
            if pin {
                // Every key whose plan this can change: the ones the Service claimed, the ones
                // it claims now (taking one over from another Service included).
                let before = planned(&table, &self.dataplane, &self.node_name);
                for vs_key in table
                    .claimed_keys(key)
                    .iter()
                    .chain(servers.iter().map(|vs| &vs.key))
                {
                    self.mirror.pin(*vs_key, &before);
                }
            }
            table.replace_service(key, servers);
            keys.extend(table.claimed_keys(key).iter().copied());
            if table.service_servers(key).any(|vs| vs.is_falling_back()) {
                self.falling_back.insert(key.clone());
            } else {
                self.falling_back.remove(key);
            }
        }
        self.known_conflicts = warn_new_conflicts(&table, &self.known_conflicts);
        self.state
            .metrics
            .set_address_conflicts(self.known_conflicts.len());
        self.replanned.add(&keys, dirty);
        keys
    }

    fn diff_keys(&self, keys: &BTreeSet<VsKey>) -> Vec<Op> {
        let table = self.read_table();
        let planned = planned(&table, &self.dataplane, &self.node_name);
        let mut batch = OpBatch::new();
        for key in keys {
            self.mirror.diff_key(&mut batch, *key, &planned);
        }
        batch.into_ops()
    }

    async fn apply(&mut self, ops: &[Op]) -> Result<(), DataplaneError> {
        if ops.is_empty() {
            return Ok(());
        }
        let result = self.dataplane.apply(ops).await;
        self.record_telemetry(TelemetryRead::Requests);
        let failed: Vec<&Op> = match &result {
            Err(DataplaneError::Apply { failed, .. }) => failed.iter().map(|f| &f.op).collect(),
            Err(DataplaneError::Read { .. } | DataplaneError::Finish { .. }) | Ok(()) => Vec::new(),
        };
        let applied = || ops.iter().filter(|op| !failed.contains(op));
        {
            let table = read_table(&self.state);
            let planned = planned(&table, &self.dataplane, &self.node_name);
            self.mirror.record(applied(), &planned);
        }
        let mut by_kind: Vec<(&'static str, u64)> = Vec::new();
        for op in applied() {
            match by_kind.iter_mut().find(|(kind, _)| *kind == op.kind()) {
                Some((_, count)) => *count += 1,
                None => by_kind.push((op.kind(), 1)),
            }
        }
        for (kind, count) in by_kind {
            self.state.metrics.dataplane_operations(kind, count);
        }
        result
    }

    /// Records the kernel writes and the dataplane's request counts; returns the per-service
    /// traffic when `read` asks for it.
    fn record_telemetry(&mut self, read: TelemetryRead) -> Vec<ServiceTraffic> {
        self.state
            .metrics
            .record_kernel_writes(crate::kernel_writes::total());
        let telemetry = self.dataplane.telemetry(read);
        if !telemetry.kernel_requests.is_empty() {
            self.state
                .metrics
                .record_kernel_requests(self.dataplane.name(), &telemetry.kernel_requests);
        }
        telemetry.traffic
    }

    fn publish_table_stats(&self) {
        let (virtual_servers, backends, locality_servers, locality_shares) = {
            let table = self.read_table();
            (
                table.len(),
                table.programmed_backends(),
                table.locality_servers(),
                table.locality_share_means(),
            )
        };
        self.state
            .metrics
            .set_table_stats(virtual_servers, backends, self.falling_back.len());
        self.state
            .metrics
            .set_locality_shares(locality_servers, &locality_shares);
    }
}

/// Brings `withheld`, the firewalled load-balancer frontends of an earlier table, to those of
/// `table`, looking only at `keys` (every key whose plan changed since), or with `None` at
/// the whole table. Returns the virtual servers new to the set, in key order.
fn update_withheld<'t>(
    withheld: &mut BTreeSet<VsKey>,
    table: &'t NodeTable,
    keys: Option<&BTreeSet<VsKey>>,
) -> Vec<&'t VirtualServer> {
    let firewalled = |vs: &&VirtualServer| !vs.source_ranges.is_open();
    let Some(keys) = keys else {
        let now: Vec<&VirtualServer> = table.servers().filter(firewalled).collect();
        let new = now
            .iter()
            .copied()
            .filter(|vs| !withheld.contains(&vs.key))
            .collect();
        *withheld = now.iter().map(|vs| vs.key).collect();
        return new;
    };
    let mut new = Vec::new();
    for key in keys {
        match table.get(key).filter(firewalled) {
            Some(vs) => {
                if withheld.insert(*key) {
                    new.push(vs);
                }
            }
            None => {
                withheld.remove(key);
            }
        }
    }
    new
}

/// A claim two Services make on one address:port: (key, winner, loser).
type ConflictId = (VsKey, ServiceKey, ServiceKey);

/// Says, once per conflict, which Service lost an address:port two Services claim (say, an
/// externalIP equal to another Service's ClusterIP): the rule of [`Conflict`] decides,
/// whatever the order the objects came in, and the loser's other addresses are unaffected.
/// Returns the conflicts now.
fn read_table(state: &AgentState) -> std::sync::RwLockReadGuard<'_, NodeTable> {
    state
        .table
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `table` in the form `dataplane` holds it (on the node `node_name`).
fn planned<'a, D: Dataplane>(
    table: &'a NodeTable,
    dataplane: &D,
    node_name: &'a str,
) -> Planned<'a> {
    let capabilities = dataplane.capabilities();
    Planned {
        table,
        scope: capabilities.tier_scope,
        local_node: capabilities.marks_local_destinations.then_some(node_name),
        enforces_source_ranges: capabilities.enforces_source_ranges,
    }
}

fn warn_new_conflicts(table: &NodeTable, known: &BTreeSet<ConflictId>) -> BTreeSet<ConflictId> {
    let mut now = BTreeSet::new();
    for conflict in table.conflicts() {
        let id = (
            conflict.key,
            conflict.winner.clone(),
            conflict.loser.clone(),
        );
        if !known.contains(&id) {
            warn_conflict(&conflict);
        }
        now.insert(id);
    }
    now
}

/// Warns that two Services claim one address:port and which keeps it (the agent and `plan`).
pub fn warn_conflict(conflict: &Conflict) {
    tracing::warn!(
        service = %conflict.loser,
        winner = %conflict.winner,
        "{} {}:{} is claimed by both {} (as {:?}) and {} (as {:?}); {} keeps it: {}",
        conflict.key.protocol,
        conflict.key.address,
        conflict.key.port,
        conflict.winner,
        conflict.winner_frontend,
        conflict.loser,
        conflict.loser_frontend,
        conflict.winner,
        conflict.reason()
    );
}

/// Until `at`, or forever. A time already reached returns at once: tokio's timer rounds every
/// deadline up to its next millisecond tick, which put up to a millisecond (more on a busy
/// machine, until a worker turns the timer) before every sync that was due already.
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) if at <= Instant::now() => {}
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The measured per-tier-position connection totals of `traffic`, labelled with the kind of
/// tier each position holds in `table`: `(virtual server, tier kind, total)`.
fn served_by_tier_kind(
    table: &NodeTable,
    traffic: &[crate::dataplane::ServiceTraffic],
) -> Vec<(VsKey, crate::table::TierKind, u64)> {
    let mut served = Vec::new();
    for sample in traffic.iter().filter(|s| !s.tier_connections.is_empty()) {
        let Some(vs) = table.get(&sample.key) else {
            continue;
        };
        for (tier, &total) in vs.tiers.iter().zip(&sample.tier_connections) {
            served.push((sample.key, tier.kind, total));
        }
    }
    served
}

#[cfg(test)]
#[path = "sync_tests.rs"]
mod tests;
