//! Prometheus metrics of the agent, served as OpenMetrics text on `/metrics`.
//!
//! Every metric is named `topoproxy_…`. Updating a metric is an atomic operation (labelled
//! families take a short internal lock the first time a label value appears), so the sync
//! loop, the watchers and the dataplane can all report through a shared `&Metrics` without
//! coordination. Nothing here panics.

use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// Prefix of every metric name.
pub const METRIC_PREFIX: &str = "topoproxy";

/// Content type of [`Metrics::encode`]'s output.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Lowest sync-duration bucket: 100 µs.
const SYNC_BUCKET_START_SECONDS: f64 = 0.000_1;
/// Each bucket doubles the previous one.
const SYNC_BUCKET_FACTOR: f64 = 2.0;
/// 19 doubling buckets from 100 µs end at ~26 s (plus `+Inf`).
const SYNC_BUCKET_COUNT: u16 = 19;

/// `result` label of `topoproxy_syncs_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// `kind` label of `topoproxy_skipped_objects_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

/// `resource` label of the watch metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabels {
    resource: String,
}

/// Labels of `topoproxy_dataplane_kernel_requests_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    dataplane: String,
    kind: String,
}

/// Labels of the per-service traffic counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    protocol: &'static str,
    address: String,
    port: u16,
}

/// `tier` label of the locality metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabels {
    tier: &'static str,
}

/// `phase` label of `topoproxy_sync_phase_duration_seconds`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

/// A step of one sync, timed on its own (`topoproxy_sync_phase_duration_seconds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPhase {
    /// From the oldest change the sync carries reaching the sync loop to the sync's start.
    Wait,
    /// Re-planning what changed (on a resync also reading the dataplane back).
    Plan,
    /// Turning the new plan into dataplane operations.
    Diff,
    /// The dataplane applying them.
    Apply,
    /// The dataplane's end of the sync and the loop's records.
    Finish,
    /// After the sync: the table metrics, the withheld frontends, the health checks.
    PostSync,
}

impl SyncPhase {
    /// Every phase, in the order a sync goes through them.
    pub const ALL: [Self; 6] = [
        Self::Wait,
        Self::Plan,
        Self::Diff,
        Self::Apply,
        Self::Finish,
        Self::PostSync,
    ];

    /// The `phase` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Wait => "wait",
            Self::Plan => "plan",
            Self::Diff => "diff",
            Self::Apply => "apply",
            Self::Finish => "finish",
            Self::PostSync => "post_sync",
        }
    }
}

/// The buckets of the sync histograms: 100 µs doubling to ~26 s.
fn sync_histogram() -> Histogram {
    Histogram::new(exponential_buckets(
        SYNC_BUCKET_START_SECONDS,
        SYNC_BUCKET_FACTOR,
        SYNC_BUCKET_COUNT,
    ))
}

/// `op` label of `topoproxy_dataplane_operations_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: String,
}

/// The agent's metrics: a registry and a handle on every metric in it.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    sync_duration: Histogram,
    sync_phases: Family<PhaseLabels, Histogram, fn() -> Histogram>,
    syncs: Family<ResultLabels, Counter>,
    last_successful_sync: Gauge<f64, AtomicU64>,
    virtual_servers: Gauge,
    backends: Gauge,
    services_falling_back: Gauge,
    address_conflicts: Gauge,
    locality_virtual_servers: Gauge,
    locality_programmed_share: Family<TierLabels, Gauge<f64, AtomicU64>>,
    locality_served_connections: Family<TierLabels, Counter>,
    /// The per-tier totals last reported per virtual server, so the counter advances by the
    /// difference.
    locality_served_totals: std::sync::Mutex<
        std::collections::HashMap<(crate::table::VsKey, crate::table::TierKind), u64>,
    >,
    skipped_objects: Family<KindLabels, Counter>,
    watch_restarts: Family<ResourceLabels, Counter>,
    watch_errors: Family<ResourceLabels, Counter>,
    api_synced: Family<ResourceLabels, Gauge>,
    dataplane_errors: Counter,
    dataplane_operations: Family<OpLabels, Counter>,
    drift_repairs: Counter,
    kernel_requests: Family<RequestLabels, Counter>,
    kernel_writes: Counter,
    /// The process's kernel-write total last reported.
    kernel_writes_reported: std::sync::atomic::AtomicU64,
    /// The totals last reported per series, so counters advance by the difference.
    kernel_request_totals: std::sync::Mutex<std::collections::HashMap<RequestLabels, u64>>,
    service_translations: Family<ServiceLabels, Counter>,
    service_affinity_hits: Family<ServiceLabels, Counter>,
    service_no_backend: Family<ServiceLabels, Counter>,
    /// The totals last reported per service and counter.
    service_totals: std::sync::Mutex<std::collections::HashMap<(ServiceLabels, u8), u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates every metric and registers it under the `topoproxy_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix(METRIC_PREFIX);

        let sync_duration = sync_histogram();
        registry.register_with_unit(
            "sync_duration",
            "Time one sync took: planning the changed Services, diffing and programming the dataplane",
            Unit::Seconds,
            sync_duration.clone(),
        );

        let sync_phases = Family::<PhaseLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            sync_histogram,
        );
        registry.register_with_unit(
            "sync_phase_duration",
            "Time each step of a sync took: wait (from the oldest change it carries reaching the sync loop to its start), plan (re-planning; on a resync with the read back), diff, apply, finish (the dataplane's end of sync and the records), post_sync (table metrics, withheld frontends, health checks)",
            Unit::Seconds,
            sync_phases.clone(),
        );
        // Every phase's series exists from the start.
        for phase in SyncPhase::ALL {
            let _ = sync_phases.get_or_create(&PhaseLabels {
                phase: phase.as_str(),
            });
        }

        let syncs = Family::<ResultLabels, Counter>::default();
        registry.register(
            "syncs",
            "Sync attempts, by result (success or failure); a failed sync keeps the last good dataplane state and is retried",
            syncs.clone(),
        );
        // Both series exist from the start, so rate() and alerts work before the first failure.
        for result in ["success", "failure"] {
            let _ = syncs.get_or_create(&ResultLabels { result });
        }

        let last_successful_sync = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "last_successful_sync_timestamp",
            "Unix time of the last sync that fully programmed the dataplane (0 until the first one)",
            Unit::Seconds,
            last_successful_sync.clone(),
        );

        let virtual_servers = Gauge::default();
        registry.register(
            "virtual_servers",
            "Virtual servers (IPVS services or BPF service entries) in this node's table",
            virtual_servers.clone(),
        );

        let backends = Gauge::default();
        registry.register(
            "backends",
            "Backends programmed now over all virtual servers (the nearest non-empty tier of each)",
            backends.clone(),
        );

        let services_falling_back = Gauge::default();
        registry.register(
            "services_falling_back",
            "Services that ask for topology-aware routing but are served cluster-wide on this node (hints missing, partial or not for this node)",
            services_falling_back.clone(),
        );

        let address_conflicts = Gauge::default();
        registry.register(
            "address_conflicts",
            "Address:port claims left out because another Service holds the same key (an allocated ClusterIP wins over an externalIP or load-balancer claim; else the smaller namespace/name)",
            address_conflicts.clone(),
        );

        let locality_virtual_servers = Gauge::default();
        registry.register(
            "locality_virtual_servers",
            "Virtual servers under a topoproxy locality policy (topoproxy.io/topology or --topology-default), Cluster traffic policy",
            locality_virtual_servers.clone(),
        );

        let locality_programmed_share = Family::<TierLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "locality_programmed_share",
            "Mean share of new connections programmed per locality tier (0 to 1) over the virtual servers under a locality policy",
            locality_programmed_share.clone(),
        );

        let locality_served_connections = Family::<TierLabels, Counter>::default();
        registry.register(
            "locality_served_connections",
            "Connections the eBPF datapath sent to backends of each locality tier, over the virtual servers under a locality policy (measured share: the rate of one tier over the sum)",
            locality_served_connections.clone(),
        );

        let skipped_objects = Family::<KindLabels, Counter>::default();
        registry.register(
            "skipped_objects",
            "API objects or endpoints skipped because they are invalid or unsupported, by kind; see the agent's warnings for which and why",
            skipped_objects.clone(),
        );

        let watch_restarts = Family::<ResourceLabels, Counter>::default();
        registry.register(
            "watch_restarts",
            "Times a watch on the Kubernetes API was restarted (re-list), by resource",
            watch_restarts.clone(),
        );

        let watch_errors = Family::<ResourceLabels, Counter>::default();
        registry.register(
            "watch_errors",
            "Errors from a watch on the Kubernetes API, by resource (\"directory\": a --source directory that cannot be read or loaded); the last good state is kept while it retries",
            watch_errors.clone(),
        );

        let api_synced = Family::<ResourceLabels, Gauge>::default();
        registry.register(
            "api_synced",
            "1 when the initial list of the resource is done and its watch is healthy, else 0",
            api_synced.clone(),
        );

        let dataplane_errors = Counter::default();
        registry.register(
            "dataplane_errors",
            "Dataplane operations that failed (netlink, nftables or BPF map updates)",
            dataplane_errors.clone(),
        );

        let dataplane_operations = Family::<OpLabels, Counter>::default();
        registry.register(
            "dataplane_operations",
            "Dataplane operations applied, by operation",
            dataplane_operations.clone(),
        );

        let drift_repairs = Counter::default();
        registry.register(
            "drift_repairs",
            "Dataplane operations applied to repair drift that the periodic re-read of kernel state found (changes made behind the agent's back)",
            drift_repairs.clone(),
        );

        let kernel_requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "dataplane_kernel_requests",
            "Requests the dataplane sent to the kernel, by dataplane and kind (IPVS netlink requests, BPF map writes)",
            kernel_requests.clone(),
        );

        let kernel_writes = Counter::default();
        registry.register(
            "dataplane_kernel_writes",
            "Kernel writes the dataplane saw succeed: IPVS commands, nftables transactions, VIPs bound or unbound, BPF map elements put or deleted",
            kernel_writes.clone(),
        );

        let service_translations = Family::<ServiceLabels, Counter>::default();
        registry.register(
            "service_translations",
            "eBPF mode: connections and unconnected datagrams sent to a backend, per virtual service (refreshed every sync-period)",
            service_translations.clone(),
        );
        let service_affinity_hits = Family::<ServiceLabels, Counter>::default();
        registry.register(
            "service_affinity_hits",
            "eBPF mode: translations that followed ClientIP session affinity, per virtual service",
            service_affinity_hits.clone(),
        );
        let service_no_backend = Family::<ServiceLabels, Counter>::default();
        registry.register(
            "service_no_backend",
            "eBPF mode: connects and datagrams refused because the virtual service had no backend in any tier",
            service_no_backend.clone(),
        );

        Self {
            registry,
            sync_duration,
            sync_phases,
            syncs,
            last_successful_sync,
            virtual_servers,
            backends,
            services_falling_back,
            address_conflicts,
            locality_virtual_servers,
            locality_programmed_share,
            locality_served_connections,
            locality_served_totals: std::sync::Mutex::default(),
            skipped_objects,
            watch_restarts,
            watch_errors,
            api_synced,
            dataplane_errors,
            dataplane_operations,
            drift_repairs,
            kernel_requests,
            kernel_writes,
            kernel_writes_reported: std::sync::atomic::AtomicU64::new(0),
            kernel_request_totals: std::sync::Mutex::default(),
            service_translations,
            service_affinity_hits,
            service_no_backend,
            service_totals: std::sync::Mutex::default(),
        }
    }

    /// Every metric as OpenMetrics text (see [`OPENMETRICS_CONTENT_TYPE`]), `# EOF` included.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::with_capacity(4096);
        encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// Records one sync attempt: its duration and whether it succeeded.
    pub fn observe_sync(&self, duration: Duration, success: bool) {
        self.sync_duration.observe(duration.as_secs_f64());
        let result = if success { "success" } else { "failure" };
        self.syncs.get_or_create(&ResultLabels { result }).inc();
    }

    /// Records how long one phase of a sync took.
    pub fn observe_sync_phase(&self, phase: SyncPhase, duration: Duration) {
        self.sync_phases
            .get_or_create(&PhaseLabels {
                phase: phase.as_str(),
            })
            .observe(duration.as_secs_f64());
    }

    /// Records when the last successful sync happened.
    pub fn set_last_successful_sync(&self, at: SystemTime) {
        let seconds = match at.duration_since(UNIX_EPOCH) {
            Ok(since) => since.as_secs_f64(),
            Err(before) => -before.duration().as_secs_f64(),
        };
        self.last_successful_sync.set(seconds);
    }

    /// Records the size of the node's table and how many Services fall back out of their
    /// topology preference.
    pub fn set_table_stats(
        &self,
        virtual_servers: usize,
        backends: usize,
        services_falling_back: usize,
    ) {
        self.virtual_servers.set(gauge_value(virtual_servers));
        self.backends.set(gauge_value(backends));
        self.services_falling_back
            .set(gauge_value(services_falling_back));
    }

    /// How many claims on an address:port lost to another Service's (see [`crate::table::Conflict`]).
    pub fn set_address_conflicts(&self, conflicts: usize) {
        self.address_conflicts.set(gauge_value(conflicts));
    }

    /// Records the programmed share per locality tier: `servers` virtual servers under a
    /// locality policy and, per tier, their mean share (0..=1).
    pub fn set_locality_shares(&self, servers: usize, shares: &[(crate::table::TierKind, f64)]) {
        self.locality_virtual_servers.set(gauge_value(servers));
        for (tier, share) in shares {
            self.locality_programmed_share
                .get_or_create(&TierLabels {
                    tier: tier.as_str(),
                })
                .set(*share);
        }
    }

    /// Advances the per-tier served-connection counters from measured totals `(virtual
    /// server, tier kind, connections to that tier's backends so far)`.
    pub fn record_locality_served(
        &self,
        served: &[(crate::table::VsKey, crate::table::TierKind, u64)],
    ) {
        if served.is_empty() {
            return;
        }
        let mut last = self
            .locality_served_totals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for &(key, tier, total) in served {
            let previous = last.insert((key, tier), total).unwrap_or(0);
            // A backend that moved tiers takes its count along; a total never runs backwards.
            self.locality_served_connections
                .get_or_create(&TierLabels {
                    tier: tier.as_str(),
                })
                .inc_by(total.saturating_sub(previous));
        }
    }

    /// Counts `count` skipped objects of `kind` (e.g. `service`, `endpointslice`, `endpoint`).
    pub fn skipped_objects(&self, kind: &str, count: u64) {
        if count == 0 {
            return;
        }
        self.skipped_objects
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .inc_by(count);
    }

    /// Counts one restart of the watch on `resource`.
    pub fn watch_restart(&self, resource: &str) {
        self.watch_restarts
            .get_or_create(&resource_labels(resource))
            .inc();
    }

    /// Counts one error from the watch on `resource`.
    pub fn watch_error(&self, resource: &str) {
        self.watch_errors
            .get_or_create(&resource_labels(resource))
            .inc();
    }

    /// Records whether `resource` is listed and watched (1) or not (0).
    pub fn set_api_synced(&self, resource: &str, synced: bool) {
        self.api_synced
            .get_or_create(&resource_labels(resource))
            .set(i64::from(synced));
    }

    /// Counts one failed dataplane operation.
    pub fn dataplane_error(&self) {
        self.dataplane_errors.inc();
    }

    /// Counts `count` applied dataplane operations of kind `op` (e.g. `add_service`).
    pub fn dataplane_operations(&self, op: &str, count: u64) {
        if count == 0 {
            return;
        }
        self.dataplane_operations
            .get_or_create(&OpLabels { op: op.to_owned() })
            .inc_by(count);
    }

    /// Records the dataplane's running totals of kernel requests by kind.
    pub fn record_kernel_requests(&self, dataplane: &str, totals: &[(&str, u64)]) {
        let mut last = self
            .kernel_request_totals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for &(kind, total) in totals {
            let labels = RequestLabels {
                dataplane: dataplane.to_owned(),
                kind: kind.to_owned(),
            };
            let previous = last.insert(labels.clone(), total).unwrap_or(0);
            let counter = self.kernel_requests.get_or_create(&labels);
            if total > previous {
                counter.inc_by(total - previous);
            }
        }
    }

    /// Records the process's running total of kernel writes.
    pub fn record_kernel_writes(&self, total: u64) {
        let previous = self
            .kernel_writes_reported
            .fetch_max(total, std::sync::atomic::Ordering::Relaxed);
        if total > previous {
            self.kernel_writes.inc_by(total - previous);
        }
    }

    /// Records the dataplane's running per-service traffic totals.
    pub fn record_service_traffic(&self, samples: &[crate::dataplane::ServiceTraffic]) {
        let mut last = self
            .service_totals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for sample in samples {
            let labels = ServiceLabels {
                protocol: sample.key.protocol.as_str(),
                address: sample.key.address.to_string(),
                port: sample.key.port,
            };
            let counts = sample.counters;
            for (index, family, total) in [
                (0u8, &self.service_translations, counts.translations),
                (1, &self.service_affinity_hits, counts.affinity_hits),
                (2, &self.service_no_backend, counts.no_backend),
            ] {
                let previous = last.insert((labels.clone(), index), total).unwrap_or(0);
                let counter = family.get_or_create(&labels);
                // A service re-created in the maps starts from zero again.
                counter.inc_by(total.saturating_sub(previous));
            }
        }
    }

    /// Counts `operations` dataplane operations that repaired drift found by a periodic re-read.
    pub fn drift_repaired(&self, operations: u64) {
        if operations == 0 {
            return;
        }
        self.drift_repairs.inc_by(operations);
    }
}

fn resource_labels(resource: &str) -> ResourceLabels {
    ResourceLabels {
        resource: resource.to_owned(),
    }
}

/// A count as a gauge value, saturating instead of wrapping.
fn gauge_value(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(metrics: &Metrics) -> Vec<String> {
        metrics
            .encode()
            .expect("encode")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn assert_line(lines: &[String], expected: &str) {
        assert!(
            lines.iter().any(|line| line == expected),
            "missing line {expected:?} in:\n{}",
            lines.join("\n")
        );
    }

    #[test]
    fn fresh_metrics_encode_with_help_and_eof() {
        let metrics = Metrics::new();
        let lines = lines(&metrics);
        assert_eq!(lines.last().map(String::as_str), Some("# EOF"));
        assert_line(&lines, "# TYPE topoproxy_sync_duration_seconds histogram");
        assert_line(&lines, "# UNIT topoproxy_sync_duration_seconds seconds");
        assert_line(&lines, "topoproxy_syncs_total{result=\"success\"} 0");
        assert_line(&lines, "topoproxy_syncs_total{result=\"failure\"} 0");
        assert_line(
            &lines,
            "topoproxy_last_successful_sync_timestamp_seconds 0.0",
        );
        assert_line(&lines, "topoproxy_services_falling_back 0");
        assert_line(&lines, "topoproxy_dataplane_errors_total 0");
        assert_line(&lines, "topoproxy_drift_repairs_total 0");
        assert!(lines
            .iter()
            .any(|line| line.starts_with("# HELP topoproxy_services_falling_back ")));
    }

    #[test]
    fn updates_show_up_as_exact_samples() {
        let metrics = Metrics::new();
        metrics.observe_sync(Duration::from_millis(3), true);
        metrics.observe_sync(Duration::from_millis(5), true);
        metrics.observe_sync(Duration::from_secs(60), false);
        metrics.set_last_successful_sync(UNIX_EPOCH + Duration::from_millis(1_700_000_000_500));
        metrics.set_table_stats(12, 40, 3);
        metrics.set_locality_shares(
            4,
            &[
                (crate::table::TierKind::SameZone, 0.75),
                (crate::table::TierKind::Cluster, 0.25),
            ],
        );
        let vs = crate::table::VsKey::new(
            crate::model::Protocol::Tcp,
            std::net::IpAddr::from([10, 96, 0, 10]),
            53,
        );
        use crate::table::TierKind::{Cluster, SameZone};
        metrics.record_locality_served(&[(vs, SameZone, 70), (vs, Cluster, 30)]);
        metrics.record_locality_served(&[(vs, SameZone, 75), (vs, Cluster, 29)]);
        metrics.skipped_objects("endpointslice", 2);
        metrics.skipped_objects("endpointslice", 1);
        metrics.skipped_objects("service", 0);
        metrics.watch_restart("services");
        metrics.watch_restart("services");
        metrics.watch_error("endpointslices");
        metrics.set_api_synced("services", true);
        metrics.set_api_synced("endpointslices", true);
        metrics.set_api_synced("endpointslices", false);
        metrics.dataplane_error();
        metrics.dataplane_operations("add_destination", 7);
        metrics.dataplane_operations("delete_service", 0);
        metrics.drift_repaired(4);
        metrics.drift_repaired(0);
        metrics.observe_sync_phase(SyncPhase::Diff, Duration::from_millis(250));
        metrics.observe_sync_phase(SyncPhase::Diff, Duration::from_millis(500));

        let lines = lines(&metrics);
        assert_line(&lines, "topoproxy_syncs_total{result=\"success\"} 2");
        assert_line(&lines, "topoproxy_locality_virtual_servers 4");
        assert_line(
            &lines,
            "topoproxy_locality_served_connections_total{tier=\"same-zone\"} 75",
        );
        assert_line(
            &lines,
            "topoproxy_locality_served_connections_total{tier=\"cluster\"} 30",
        );
        assert_line(
            &lines,
            "topoproxy_locality_programmed_share{tier=\"same-zone\"} 0.75",
        );
        assert_line(
            &lines,
            "topoproxy_locality_programmed_share{tier=\"cluster\"} 0.25",
        );
        assert_line(&lines, "topoproxy_syncs_total{result=\"failure\"} 1");
        assert_line(&lines, "topoproxy_sync_duration_seconds_count 3");
        assert_line(
            &lines,
            "topoproxy_sync_phase_duration_seconds_sum{phase=\"diff\"} 0.75",
        );
        assert_line(
            &lines,
            "topoproxy_sync_phase_duration_seconds_count{phase=\"post_sync\"} 0",
        );
        assert_line(
            &lines,
            "topoproxy_sync_duration_seconds_bucket{le=\"+Inf\"} 3",
        );
        assert_line(
            &lines,
            "topoproxy_sync_duration_seconds_bucket{le=\"0.0064\"} 2",
        );
        assert_line(
            &lines,
            "topoproxy_last_successful_sync_timestamp_seconds 1700000000.5",
        );
        assert_line(&lines, "topoproxy_virtual_servers 12");
        assert_line(&lines, "topoproxy_backends 40");
        assert_line(&lines, "topoproxy_services_falling_back 3");
        assert_line(
            &lines,
            "topoproxy_skipped_objects_total{kind=\"endpointslice\"} 3",
        );
        assert!(!lines.iter().any(|line| line.contains("kind=\"service\"")));
        assert_line(
            &lines,
            "topoproxy_watch_restarts_total{resource=\"services\"} 2",
        );
        assert_line(
            &lines,
            "topoproxy_watch_errors_total{resource=\"endpointslices\"} 1",
        );
        assert_line(&lines, "topoproxy_api_synced{resource=\"services\"} 1");
        assert_line(
            &lines,
            "topoproxy_api_synced{resource=\"endpointslices\"} 0",
        );
        assert_line(&lines, "topoproxy_dataplane_errors_total 1");
        assert_line(
            &lines,
            "topoproxy_dataplane_operations_total{op=\"add_destination\"} 7",
        );
        assert!(!lines.iter().any(|line| line.contains("delete_service")));
        assert_line(&lines, "topoproxy_drift_repairs_total 4");
    }

    #[test]
    fn huge_counts_saturate_and_old_times_do_not_panic() {
        let metrics = Metrics::new();
        metrics.set_table_stats(usize::MAX, 0, 0);
        metrics.set_last_successful_sync(UNIX_EPOCH - Duration::from_secs(2));
        let lines = lines(&metrics);
        assert_line(&lines, &format!("topoproxy_virtual_servers {}", i64::MAX));
        assert_line(
            &lines,
            "topoproxy_last_successful_sync_timestamp_seconds -2.0",
        );
    }
}
