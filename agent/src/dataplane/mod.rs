//! The dataplane boundary: read what is programmed, apply changes.
//!
//! The sync loop only ever talks to a [`Dataplane`]. Kernel dataplanes (IPVS, eBPF) live behind
//! it; [`memory::MemoryDataplane`] is the in-memory one used by `--proxy-mode dry-run` and by
//! tests.

pub mod conntrack_sysctls;
pub mod ebpf;
pub mod ipvs;
pub mod memory;
pub mod op;
pub mod programmed;

use std::collections::BTreeSet;
use std::future::Future;
use std::net::IpAddr;

pub use programmed::{
    compact, programmed_table, DestinationState, ProgrammedService, ProgrammedTable, ServiceConfig,
    TierScope, TierShares,
};

use crate::dataplane::op::Op;
use crate::table::VsKey;

/// Why a dataplane could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// Reading the dataplane's state failed.
    #[error("reading the {dataplane} dataplane failed")]
    Read {
        dataplane: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// Some changes were not applied; the others were.
    #[error("{} of the changes to the {dataplane} dataplane failed; first: {}", failed.len(), first_failure(failed))]
    Apply {
        dataplane: &'static str,
        failed: Vec<FailedOp>,
    },
    /// Every change was applied, but finishing the sync ([`Dataplane::synced`]) failed.
    #[error("finishing the sync on the {dataplane} dataplane failed")]
    Finish {
        dataplane: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

impl DataplaneError {
    /// The error of a failed [`Dataplane::synced`] of `dataplane`, keeping `source` as its cause.
    pub fn finish(
        dataplane: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Self::Finish {
            dataplane,
            source: source.into(),
        }
    }

    /// The read error of `dataplane`, keeping `source` as its cause.
    pub fn read(
        dataplane: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Self::Read {
            dataplane,
            source: source.into(),
        }
    }

    /// The apply error for `failures`: (index into `ops`, reason) pairs, in op order.
    pub fn apply_failures(
        dataplane: &'static str,
        ops: &[Op],
        failures: impl IntoIterator<Item = (usize, String)>,
    ) -> Self {
        Self::Apply {
            dataplane,
            failed: failures
                .into_iter()
                .map(|(index, reason)| FailedOp {
                    op: ops[index].clone(),
                    reason,
                })
                .collect(),
        }
    }
}

/// An error with its causes, `: `-separated, for messages that outlive the error.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// One change that a dataplane refused or could not make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedOp {
    pub op: Op,
    pub reason: String,
}

fn first_failure(failed: &[FailedOp]) -> String {
    failed
        .first()
        .map(|f| format!("{} {:?}: {}", f.op.kind(), f.op.service(), f.reason))
        .unwrap_or_default()
}

/// A virtual service's counters, as a dataplane keeps them (eBPF: summed over CPUs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceCounters {
    /// Connections (and unconnected datagrams) sent to a backend.
    pub translations: u64,
    /// Of those, how many followed session affinity.
    pub affinity_hits: u64,
    /// Attempts refused because the service had no backend at all.
    pub no_backend: u64,
}

/// Running totals of one virtual service's traffic, as a dataplane counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceTraffic {
    pub key: VsKey,
    pub counters: ServiceCounters,
    /// Under a locality policy, connections sent to the backends now in each tier position
    /// (eBPF: from the per-backend counters); empty where not measured.
    pub tier_connections: Vec<u64>,
}

/// Names a virtual service's Service (`namespace/name`) for logs; `None` if unknown.
pub type ServiceNames = std::sync::Arc<dyn Fn(&VsKey) -> Option<String> + Send + Sync>;

/// How a dataplane holds the plan, fixed by its kind: the sync loop plans and diffs in the
/// same terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Which tiers of each virtual server it holds.
    pub tier_scope: TierScope,
    /// Whether it holds which destinations run on this node ([`DestinationState::local`]); the
    /// sync loop marks them when it does.
    pub marks_local_destinations: bool,
    /// Whether it enforces `loadBalancerSourceRanges` ([`ServiceConfig::source_ranges`]). One
    /// that does not is never given a load-balancer frontend that has ranges: it stays closed
    /// on this node rather than open to every source.
    pub enforces_source_ranges: bool,
}

impl Default for Capabilities {
    fn default() -> Self {
        Self {
            tier_scope: TierScope::Active,
            marks_local_destinations: false,
            enforces_source_ranges: true,
        }
    }
}

/// Which counters a telemetry read takes: the request totals are cheap and read after every
/// sync; the per-service traffic walks every service and is read at each periodic re-read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TelemetryRead {
    Requests,
    RequestsAndTraffic,
}

/// What a dataplane has counted since it started, for the metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Telemetry {
    /// Requests sent to the kernel, by kind (running totals).
    pub kernel_requests: Vec<(&'static str, u64)>,
    /// Per-service traffic (running totals); empty unless asked for and counted.
    pub traffic: Vec<ServiceTraffic>,
}

/// Something that programs a node's virtual services.
///
/// Every method runs on the sync loop's task and may block on the kernel (netlink, nft, map
/// calls) even where it is `async`: the agent runs that loop on the main thread's `block_on`,
/// so a blocking call stalls only the loop itself.
pub trait Dataplane: Send {
    /// A short name for logs and metrics (`ipvs`, `ebpf`, `dry-run`).
    fn name(&self) -> &'static str;

    /// How this dataplane holds the plan.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    /// Reads the node's own addresses again (kube-proxy's node address set: every device but
    /// the dataplane's own, without loopback and IPv6 link-local) and brings what the
    /// dataplane derives from them up to date (IPVS: the addresses its input filter leaves
    /// alone). `None`: this dataplane does not look at the host (dry-run), and NodePorts sit
    /// on the Node object's addresses.
    fn refresh_node_addresses(
        &mut self,
    ) -> impl Future<Output = Option<Result<BTreeSet<IpAddr>, DataplaneError>>> + Send {
        std::future::ready(None)
    }

    /// Called after every successful sync, once the dataplane holds the whole plan (the eBPF
    /// dataplane switches its programs to freshly loaded maps then; the IPVS one unbinds the
    /// addresses its read found unneeded and the sync did not take up).
    fn synced(&mut self) -> impl Future<Output = Result<(), DataplaneError>> + Send {
        async { Ok(()) }
    }

    /// Gives the dataplane the Service names behind virtual services, for its own logs.
    fn attach_service_names(&mut self, _names: ServiceNames) {}

    /// The counters this dataplane keeps (none by default). Reads only: a failed counter read
    /// is logged by the dataplane and leaves that part empty.
    fn telemetry(&mut self, _read: TelemetryRead) -> Telemetry {
        Telemetry::default()
    }

    /// The virtual services this dataplane currently has programmed and owns.
    fn read(&mut self) -> impl Future<Output = Result<ProgrammedTable, DataplaneError>> + Send;

    /// Applies `ops` in order. On partial failure the error lists exactly the ops that were
    /// not applied; every other op was.
    fn apply(&mut self, ops: &[Op]) -> impl Future<Output = Result<(), DataplaneError>> + Send;
}
