//! Graceful removal of TCP real servers: which destinations are draining and when they may go.
//!
//! A removed TCP destination is first set to weight 0, so IPVS sends it no new connections
//! while its established ones carry on; it is deleted once it has no connections left, or when
//! the drain timeout passes. UDP and SCTP destinations are never drained: they are deleted at
//! once (and their conntrack entries flushed), as kube-proxy does, so DNS does not keep
//! answering from a dead backend. Pure bookkeeping: the caller reads connection counts from the
//! kernel and passes the clock in.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::model::Protocol;
use crate::table::VsKey;

/// One draining destination of one virtual service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DrainKey {
    pub service: VsKey,
    pub address: IpAddr,
    pub port: u16,
}

/// What to do with a draining destination now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainVerdict {
    /// It still has connections and time left.
    Keep,
    /// No connections left: delete it.
    Drained,
    /// The timeout passed with connections still open: delete it anyway.
    TimedOut,
}

/// Whether removing a destination of `protocol` drains it (TCP) or deletes it at once.
pub fn drains(protocol: Protocol) -> bool {
    matches!(protocol, Protocol::Tcp)
}

/// The verdict for a destination that started draining at `since`.
pub fn verdict(since: Instant, now: Instant, timeout: Duration, connections: u64) -> DrainVerdict {
    if connections == 0 {
        DrainVerdict::Drained
    } else if now.saturating_duration_since(since) >= timeout {
        DrainVerdict::TimedOut
    } else {
        DrainVerdict::Keep
    }
}

/// The destinations currently draining, with when each started.
#[derive(Debug, Default)]
pub struct Draining {
    entries: BTreeMap<DrainKey, Instant>,
}

impl Draining {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts draining `key` (keeps the earlier start when it already drains).
    pub fn start(&mut self, key: DrainKey, now: Instant) {
        self.entries.entry(key).or_insert(now);
    }

    /// Stops draining `key` because its endpoint came back; true when it was draining.
    pub fn cancel(&mut self, key: &DrainKey) -> bool {
        self.entries.remove(key).is_some()
    }

    pub fn contains(&self, key: &DrainKey) -> bool {
        self.entries.contains_key(key)
    }

    /// When `key` started draining.
    pub fn since(&self, key: &DrainKey) -> Option<Instant> {
        self.entries.get(key).copied()
    }

    /// Forgets every draining destination of `service` (the service itself went).
    pub fn forget_service(&mut self, service: &VsKey) {
        self.entries.retain(|key, _| &key.service != service);
    }

    /// The virtual services with at least one draining destination.
    pub fn services(&self) -> BTreeSet<VsKey> {
        self.entries.keys().map(|key| key.service).collect()
    }

    /// The draining destinations of `service`.
    pub fn of_service<'a>(&'a self, service: &'a VsKey) -> impl Iterator<Item = DrainKey> + 'a {
        self.entries
            .keys()
            .filter(move |key| &key.service == service)
            .copied()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> DrainKey {
        DrainKey {
            service: VsKey::new(Protocol::Tcp, "10.96.0.1".parse().expect("address"), 80),
            address: "10.244.0.5".parse().expect("address"),
            port,
        }
    }

    #[test]
    fn only_tcp_drains() {
        assert!(drains(Protocol::Tcp));
        assert!(!drains(Protocol::Udp));
        assert!(!drains(Protocol::Sctp));
    }

    #[test]
    fn a_destination_goes_when_drained_or_timed_out() {
        let start = Instant::now();
        let timeout = Duration::from_secs(60);
        assert_eq!(verdict(start, start, timeout, 0), DrainVerdict::Drained);
        assert_eq!(verdict(start, start, timeout, 3), DrainVerdict::Keep);
        assert_eq!(
            verdict(start, start + Duration::from_secs(59), timeout, 3),
            DrainVerdict::Keep
        );
        assert_eq!(
            verdict(start, start + timeout, timeout, 3),
            DrainVerdict::TimedOut
        );
    }

    #[test]
    fn restarting_a_drain_keeps_its_first_start() {
        let mut draining = Draining::new();
        let first = Instant::now();
        draining.start(key(80), first);
        draining.start(key(80), first + Duration::from_secs(10));
        assert_eq!(draining.since(&key(80)), Some(first));
    }

    #[test]
    fn a_returning_endpoint_cancels_its_drain() {
        let mut draining = Draining::new();
        draining.start(key(80), Instant::now());
        assert!(draining.cancel(&key(80)));
        assert!(!draining.cancel(&key(80)));
        assert!(draining.is_empty());
    }

    #[test]
    fn a_deleted_service_forgets_its_drains() {
        let mut draining = Draining::new();
        draining.start(key(80), Instant::now());
        draining.start(key(81), Instant::now());
        assert_eq!(draining.services().len(), 1);
        assert_eq!(draining.of_service(&key(80).service).count(), 2);
        draining.forget_service(&key(80).service);
        assert!(draining.is_empty());
    }
}
