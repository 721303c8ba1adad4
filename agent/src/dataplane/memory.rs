//! An in-memory dataplane: keeps the table it is given, programs nothing.
//!
//! It backs `--proxy-mode dry-run` (the agent runs in shadow beside kube-proxy and serves its
//! table on `/plan`) and the end-to-end tests, which read its state through a
//! [`MemoryHandle`], inject drift and failures, and time every apply.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::watch;

use crate::dataplane::op::{apply_to, Op};

use super::{compact, Capabilities, Dataplane, DataplaneError, FailedOp, ProgrammedTable};

#[derive(Debug, Default)]
struct Inner {
    table: ProgrammedTable,
    applies: u64,
    ops_applied: u64,
    reads: u64,
    fail_next_applies: u32,
    fail_next_reads: u32,
    synced_calls: u64,
    /// Plays a dataplane whose end-of-sync step (a map switch, a tc attach) fails.
    fail_next_synced: u32,
    /// The node addresses it reports, as if it read them from a host.
    node_addresses: Option<BTreeSet<IpAddr>>,
    /// Plays a dataplane that cannot enforce `loadBalancerSourceRanges`.
    ignores_source_ranges: bool,
}

/// What the last apply did, for observers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyRecord {
    /// Number of apply calls so far.
    pub applies: u64,
    /// When the latest apply finished.
    pub at: Option<Instant>,
}

/// The in-memory dataplane.
pub struct MemoryDataplane {
    name: &'static str,
    inner: Arc<Mutex<Inner>>,
    applied: watch::Sender<ApplyRecord>,
}

/// A window into a [`MemoryDataplane`] for tests and benchmarks.
#[derive(Clone)]
pub struct MemoryHandle {
    inner: Arc<Mutex<Inner>>,
    applied: watch::Receiver<ApplyRecord>,
}

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // The data is a plain table; a panic elsewhere cannot leave it half-written.
    inner
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl MemoryDataplane {
    /// A dataplane that reports itself as `name` (`dry-run`, or `memory` in tests).
    pub fn new(name: &'static str) -> (Self, MemoryHandle) {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let (applied, observed) = watch::channel(ApplyRecord {
            applies: 0,
            at: None,
        });
        (
            Self {
                name,
                inner: Arc::clone(&inner),
                applied,
            },
            MemoryHandle {
                inner,
                applied: observed,
            },
        )
    }
}

impl Dataplane for MemoryDataplane {
    fn name(&self) -> &'static str {
        self.name
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            enforces_source_ranges: !lock(&self.inner).ignores_source_ranges,
            ..Capabilities::default()
        }
    }

    fn refresh_node_addresses(
        &mut self,
    ) -> impl std::future::Future<Output = Option<Result<BTreeSet<IpAddr>, DataplaneError>>> + Send
    {
        std::future::ready(lock(&self.inner).node_addresses.clone().map(Ok))
    }

    async fn synced(&mut self) -> Result<(), DataplaneError> {
        let mut inner = lock(&self.inner);
        inner.synced_calls += 1;
        if inner.fail_next_synced > 0 {
            inner.fail_next_synced -= 1;
            return Err(DataplaneError::read(self.name, "injected synced failure"));
        }
        Ok(())
    }

    async fn read(&mut self) -> Result<ProgrammedTable, DataplaneError> {
        let mut inner = lock(&self.inner);
        inner.reads += 1;
        if inner.fail_next_reads > 0 {
            inner.fail_next_reads -= 1;
            return Err(DataplaneError::read(self.name, "injected read failure"));
        }
        Ok(inner.table.clone())
    }

    async fn apply(&mut self, ops: &[Op]) -> Result<(), DataplaneError> {
        let (result, applies) = {
            let mut inner = lock(&self.inner);
            inner.applies += 1;
            let applies = inner.applies;
            if inner.fail_next_applies > 0 {
                inner.fail_next_applies -= 1;
                let failed = ops
                    .iter()
                    .map(|op| FailedOp {
                        op: op.clone(),
                        reason: "injected failure".to_owned(),
                    })
                    .collect();
                (
                    Err(DataplaneError::Apply {
                        dataplane: self.name,
                        failed,
                    }),
                    applies,
                )
            } else {
                let rejected = apply_to(&mut inner.table, ops);
                let added = ops
                    .iter()
                    .filter(|op| matches!(op, Op::AddService { .. }))
                    .count();
                if added > inner.table.len() / 2 {
                    // A bulk load (the initial sync): see `compact`.
                    compact(&mut inner.table);
                }
                inner.ops_applied += (ops.len() - rejected.len()) as u64;
                let result = if rejected.is_empty() {
                    Ok(())
                } else {
                    Err(DataplaneError::Apply {
                        dataplane: self.name,
                        failed: rejected
                            .into_iter()
                            .map(|op| FailedOp {
                                op,
                                reason: "no such virtual service".to_owned(),
                            })
                            .collect(),
                    })
                };
                (result, applies)
            }
        };
        self.applied.send_replace(ApplyRecord {
            applies,
            at: Some(Instant::now()),
        });
        result
    }
}

impl MemoryHandle {
    /// A copy of the programmed table.
    pub fn table(&self) -> ProgrammedTable {
        lock(&self.inner).table.clone()
    }

    /// Number of apply calls so far.
    pub fn applies(&self) -> u64 {
        lock(&self.inner).applies
    }

    /// Number of ops accepted so far.
    pub fn ops_applied(&self) -> u64 {
        lock(&self.inner).ops_applied
    }

    /// Number of read calls so far.
    pub fn reads(&self) -> u64 {
        lock(&self.inner).reads
    }

    /// Changes the table behind the agent's back, as another actor on the node would.
    pub fn tamper(&self, change: impl FnOnce(&mut ProgrammedTable)) {
        change(&mut lock(&self.inner).table);
    }

    /// Makes the next `count` apply calls fail entirely.
    pub fn fail_next_applies(&self, count: u32) {
        lock(&self.inner).fail_next_applies = count;
    }

    /// Makes the next `count` read calls fail.
    pub fn fail_next_reads(&self, count: u32) {
        lock(&self.inner).fail_next_reads = count;
    }

    /// Makes the next `count` `synced` calls (the end of a successful sync) fail.
    pub fn fail_next_synced(&self, count: u32) {
        lock(&self.inner).fail_next_synced = count;
    }

    /// Number of `synced` calls so far.
    pub fn synced_calls(&self) -> u64 {
        lock(&self.inner).synced_calls
    }

    /// Reports `addresses` as the node's own from the next sync on (`None`: no host view,
    /// as dry-run).
    pub fn set_node_addresses(&self, addresses: Option<BTreeSet<IpAddr>>) {
        lock(&self.inner).node_addresses = addresses;
    }

    /// Plays a dataplane that cannot enforce `loadBalancerSourceRanges` (eBPF today).
    pub fn ignore_source_ranges(&self) {
        lock(&self.inner).ignores_source_ranges = true;
    }

    /// Notified after every apply.
    pub fn subscribe(&self) -> watch::Receiver<ApplyRecord> {
        self.applied.clone()
    }
}
