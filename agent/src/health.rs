//! Health of the agent, judged the way kube-proxy judges its own for `/healthz`.
//!
//! The sync loop reports what it does ([`HealthTracker::record_sync_success`],
//! [`HealthTracker::record_sync_failure`]), the sources report changes not yet synced
//! ([`HealthTracker::record_pending_change`]) and which initial lists are still running
//! ([`HealthTracker::set_waiting_for`]); the HTTP server asks for a [`HealthStatus`] at a given
//! time. Judging takes an explicit `now`, so every rule is testable without a clock.
//!
//! The agent is unhealthy, checked in this order, when:
//! 1. it has never synced successfully (waiting for the initial lists, or for the first sync);
//! 2. its most recent sync attempt failed;
//! 3. a change has been pending for longer than `stale_after`;
//! 4. its last successful sync is older than `stale_after` (the periodic sync stopped).

use std::fmt::Write as _;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Serialize, Serializer};
use thiserror::Error;

/// Errors of this module.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HealthError {
    /// A time cannot be written as an RFC 3339 timestamp (after year 9999).
    #[error("time {seconds_since_epoch}s after the unix epoch cannot be formatted as rfc 3339")]
    TimeOutOfRange {
        /// The time, in whole seconds since the Unix epoch.
        seconds_since_epoch: u64,
    },
}

/// What the health endpoints report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthStatus {
    /// Whether the agent keeps the dataplane in step with the cluster.
    pub healthy: bool,
    /// Why the agent is unhealthy; `None` when healthy.
    pub reason: Option<String>,
    /// When the last successful sync happened, if ever (RFC 3339 in JSON).
    #[serde(serialize_with = "serialize_optional_time")]
    pub last_successful_sync: Option<SystemTime>,
    /// The time the status was judged at (RFC 3339 in JSON).
    #[serde(serialize_with = "serialize_time")]
    pub current_time: SystemTime,
    /// `/healthz` only: whether load balancers may keep sending to this node (false while the
    /// Node is being deleted or tainted `ToBeDeletedByClusterAutoscaler`), as kube-proxy's
    /// `nodeEligible`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_eligible: Option<bool>,
}

#[derive(Debug, Default)]
struct Inner {
    waiting_for: Vec<String>,
    /// The last error of each resource's watch, until its next successful list.
    watch_errors: std::collections::BTreeMap<String, String>,
    last_success: Option<SystemTime>,
    /// Set when the most recent attempt failed; cleared by a success.
    last_failure: Option<(SystemTime, String)>,
    /// The oldest change not yet synced.
    oldest_pending: Option<SystemTime>,
    /// Why this node is leaving the cluster, if it is.
    node_leaving: Option<String>,
}

/// Tracks sync outcomes and pending changes; shared by reference between the sync loop, the
/// sources and the HTTP server. Never holds its lock across an `.await` (all methods are sync).
#[derive(Debug)]
pub struct HealthTracker {
    stale_after: Duration,
    inner: Mutex<Inner>,
}

impl HealthTracker {
    /// A tracker that calls the agent unhealthy when a change stays unsynced, or no sync
    /// succeeds, for longer than `stale_after` (the agent passes 2 × its sync period).
    pub fn new(stale_after: Duration) -> Self {
        Self {
            stale_after,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// How long a change may stay unsynced before the agent counts as unhealthy.
    pub fn stale_after(&self) -> Duration {
        self.stale_after
    }

    /// A sync fully programmed the dataplane at `at`: clears the failure and pending changes.
    pub fn record_sync_success(&self, at: SystemTime) {
        let mut inner = self.lock();
        inner.last_success = Some(at);
        inner.last_failure = None;
        inner.oldest_pending = None;
    }

    /// A sync attempt failed at `at` for `reason`; pending changes stay pending.
    pub fn record_sync_failure(&self, at: SystemTime, reason: String) {
        self.lock().last_failure = Some((at, reason));
    }

    /// A change was observed at `at` that no sync has applied yet. Only the oldest pending
    /// change counts; the next successful sync clears it.
    pub fn record_pending_change(&self, at: SystemTime) {
        let mut inner = self.lock();
        inner.oldest_pending = Some(match inner.oldest_pending {
            Some(oldest) => oldest.min(at),
            None => at,
        });
    }

    /// Resources whose initial list is not done yet (e.g. `["services", "endpointslices"]`);
    /// empty once all are listed.
    pub fn set_waiting_for(&self, what: Vec<String>) {
        self.lock().waiting_for = what;
    }

    /// `resource`'s watch failed with `error` (e.g. a 403 while RBAC is missing a rule); shown
    /// in the reason while its initial list is not done.
    pub fn record_watch_error(&self, resource: &str, error: String) {
        self.lock().watch_errors.insert(resource.to_owned(), error);
    }

    /// `resource` was listed successfully: its last watch error no longer applies.
    pub fn clear_watch_error(&self, resource: &str) {
        self.lock().watch_errors.remove(resource);
    }

    /// Whether this node is leaving the cluster, and why (from its Node object).
    pub fn set_node_leaving(&self, reason: Option<String>) {
        self.lock().node_leaving = reason;
    }

    /// Judges the agent's own health at `now`: `/livez`, and the `serviceProxyHealthy` of the
    /// health-check node ports.
    pub fn status(&self, now: SystemTime) -> HealthStatus {
        let inner = self.lock();
        let reason = self.unhealthy_reason(&inner, now);
        HealthStatus {
            healthy: reason.is_none(),
            reason,
            last_successful_sync: inner.last_success,
            current_time: now,
            node_eligible: None,
        }
    }

    /// `/healthz`: the agent's health, and unhealthy as well while the node is leaving, so
    /// load balancers drain it first (kube-proxy since KEP-3836).
    pub fn healthz_status(&self, now: SystemTime) -> HealthStatus {
        let mut status = self.status(now);
        let leaving = self.lock().node_leaving.clone();
        status.node_eligible = Some(leaving.is_none());
        if let (true, Some(leaving)) = (status.healthy, leaving) {
            status.healthy = false;
            status.reason = Some(leaving);
        }
        status
    }

    fn unhealthy_reason(&self, inner: &Inner, now: SystemTime) -> Option<String> {
        let Some(last_success) = inner.last_success else {
            if !inner.waiting_for.is_empty() {
                let errors: Vec<String> = inner
                    .waiting_for
                    .iter()
                    .filter_map(|waiting| {
                        // "node NAME" waits for the "node" resource.
                        let resource = waiting.split(' ').next().unwrap_or(waiting);
                        let error = inner.watch_errors.get(resource)?;
                        Some(format!("{resource}: {error}"))
                    })
                    .collect();
                let mut reason = format!(
                    "waiting for the initial list of {}",
                    inner.waiting_for.join(", ")
                );
                if !errors.is_empty() {
                    reason.push_str(&format!(" (last error: {})", errors.join("; ")));
                }
                return Some(reason);
            }
            if let Some((at, reason)) = &inner.last_failure {
                return Some(format!(
                    "no successful sync yet; last sync failed at {}: {reason}",
                    format_time(*at)
                ));
            }
            return Some("waiting for the first sync".to_owned());
        };
        if let Some((at, reason)) = &inner.last_failure {
            return Some(format!(
                "last sync failed at {}: {reason}",
                format_time(*at)
            ));
        }
        if let Some(pending) = inner.oldest_pending {
            let age = elapsed(pending, now);
            if age > self.stale_after {
                return Some(format!(
                    "changes pending for {}, not synced",
                    format_age(age)
                ));
            }
        }
        let age = elapsed(last_success, now);
        if age > self.stale_after {
            return Some(format!(
                "no successful sync for {} (last at {})",
                format_age(age),
                format_time(last_success)
            ));
        }
        None
    }

    /// The lock, recovered if a panicking thread poisoned it: the state is plain data and
    /// stays consistent field by field.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Time from `since` to `now`; zero if the clock went backwards.
fn elapsed(since: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(since).unwrap_or(Duration::ZERO)
}

/// An age in whole seconds, e.g. `75s`.
fn format_age(age: Duration) -> String {
    format!("{}s", age.as_secs())
}

/// `at` as RFC 3339 with milliseconds, UTC (`2024-05-01T12:00:00.000Z`). Times before the
/// Unix epoch are clamped to it.
pub fn try_format_time(at: SystemTime) -> Result<String, HealthError> {
    let at = at.max(UNIX_EPOCH);
    let mut out = String::with_capacity(24);
    write!(out, "{}", humantime::format_rfc3339_millis(at)).map_err(|_| {
        HealthError::TimeOutOfRange {
            seconds_since_epoch: at
                .duration_since(UNIX_EPOCH)
                .map(|since| since.as_secs())
                .unwrap_or(0),
        }
    })?;
    Ok(out)
}

/// Like [`try_format_time`], but clamps times past year 9999 to its last millisecond.
pub fn format_time(at: SystemTime) -> String {
    try_format_time(at).unwrap_or_else(|_| "9999-12-31T23:59:59.999Z".to_owned())
}

fn serialize_time<S: Serializer>(at: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format_time(*at))
}

fn serialize_optional_time<S: Serializer>(
    at: &Option<SystemTime>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match at {
        Some(at) => serializer.serialize_str(&format_time(*at)),
        None => serializer.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2024-01-01T00:00:00Z.
    const T0: u64 = 1_704_067_200;
    const STALE: Duration = Duration::from_secs(60);

    fn t(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(T0 + seconds)
    }

    #[derive(Clone, Copy)]
    enum Event {
        Waiting(&'static [&'static str]),
        Success(u64),
        Failure(u64, &'static str),
        Pending(u64),
    }

    fn tracker_after(events: &[Event]) -> HealthTracker {
        let tracker = HealthTracker::new(STALE);
        for event in events {
            match *event {
                Event::Waiting(what) => {
                    tracker.set_waiting_for(what.iter().map(|s| (*s).to_owned()).collect())
                }
                Event::Success(at) => tracker.record_sync_success(t(at)),
                Event::Failure(at, reason) => tracker.record_sync_failure(t(at), reason.to_owned()),
                Event::Pending(at) => tracker.record_pending_change(t(at)),
            }
        }
        tracker
    }

    #[test]
    fn rules() {
        use Event::*;
        let cases: &[(&str, &[Event], u64, Option<&str>)] = &[
            (
                "nothing yet",
                &[],
                0,
                Some("waiting for the first sync"),
            ),
            (
                "initial lists running",
                &[Waiting(&["services", "endpointslices"])],
                5,
                Some("waiting for the initial list of services, endpointslices"),
            ),
            (
                "lists done, first sync not yet",
                &[Waiting(&["services"]), Waiting(&[])],
                5,
                Some("waiting for the first sync"),
            ),
            (
                "lists done, first sync failed",
                &[Waiting(&[]), Failure(3, "netlink: permission denied")],
                5,
                Some("no successful sync yet; last sync failed at 2024-01-01T00:00:03.000Z: netlink: permission denied"),
            ),
            (
                "waiting wins before the first success",
                &[Waiting(&["endpointslices"]), Failure(3, "boom")],
                5,
                Some("waiting for the initial list of endpointslices"),
            ),
            ("fresh success", &[Waiting(&[]), Success(10)], 20, None),
            (
                "success even while a relist runs",
                &[Success(10), Waiting(&["services"])],
                20,
                None,
            ),
            (
                "last attempt failed",
                &[Success(10), Failure(40, "nft: table busy")],
                41,
                Some("last sync failed at 2024-01-01T00:00:40.000Z: nft: table busy"),
            ),
            (
                "failure then success recovers",
                &[Success(10), Failure(40, "x"), Success(45)],
                50,
                None,
            ),
            (
                "pending change within the limit",
                &[Success(30), Pending(40)],
                85,
                None,
            ),
            (
                "pending change exactly at the limit",
                &[Success(30), Pending(30)],
                90,
                None,
            ),
            (
                "pending change too old",
                &[Success(10), Pending(25), Pending(30)],
                100,
                Some("changes pending for 75s, not synced"),
            ),
            (
                "oldest pending change counts",
                &[Success(10), Pending(40), Pending(20)],
                100,
                Some("changes pending for 80s, not synced"),
            ),
            (
                "pending cleared by success",
                &[Success(10), Pending(20), Success(30)],
                85,
                None,
            ),
            (
                "failure reported before a stale pending change",
                &[Success(10), Pending(20), Failure(30, "boom")],
                200,
                Some("last sync failed at 2024-01-01T00:00:30.000Z: boom"),
            ),
            (
                "no successful sync for too long",
                &[Success(10)],
                71,
                Some("no successful sync for 61s (last at 2024-01-01T00:00:10.000Z)"),
            ),
            (
                "clock went backwards",
                &[Success(100), Pending(100)],
                50,
                None,
            ),
        ];
        for (name, events, now, expected) in cases {
            let status = tracker_after(events).status(t(*now));
            assert_eq!(status.reason.as_deref(), *expected, "case {name:?}");
            assert_eq!(status.healthy, expected.is_none(), "case {name:?}");
            assert_eq!(status.current_time, t(*now), "case {name:?}");
        }
    }

    #[test]
    fn status_reports_last_success() {
        let tracker = tracker_after(&[Event::Success(10), Event::Success(20)]);
        assert_eq!(tracker.status(t(30)).last_successful_sync, Some(t(20)));
        assert_eq!(
            HealthTracker::new(STALE).status(t(0)).last_successful_sync,
            None
        );
    }

    #[test]
    fn json_uses_camel_case_and_rfc3339() {
        let healthy =
            tracker_after(&[Event::Success(10)]).status(t(20) + Duration::from_millis(250));
        let json = serde_json::to_value(&healthy).expect("serialize");
        assert_eq!(
            json,
            serde_json::json!({
                "healthy": true,
                "reason": null,
                "lastSuccessfulSync": "2024-01-01T00:00:10.000Z",
                "currentTime": "2024-01-01T00:00:20.250Z",
            })
        );

        let unhealthy = HealthTracker::new(STALE).status(t(0));
        let json = serde_json::to_value(&unhealthy).expect("serialize");
        assert_eq!(json["healthy"], false);
        assert_eq!(json["reason"], "waiting for the first sync");
        assert_eq!(json["lastSuccessfulSync"], serde_json::Value::Null);
    }

    #[test]
    fn times_out_of_range_do_not_panic() {
        assert_eq!(
            format_time(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00.000Z"
        );
        let far = UNIX_EPOCH + Duration::from_secs(300_000_000_000);
        assert_eq!(
            try_format_time(far),
            Err(HealthError::TimeOutOfRange {
                seconds_since_epoch: 300_000_000_000
            })
        );
        assert_eq!(format_time(far), "9999-12-31T23:59:59.999Z");
    }

    #[test]
    fn healthz_fails_while_the_node_is_leaving_and_livez_ignores_it() {
        let tracker = HealthTracker::new(Duration::from_secs(60));
        tracker.set_waiting_for(Vec::new());
        tracker.record_sync_success(t(100));
        assert!(tracker.healthz_status(t(101)).healthy);
        assert_eq!(tracker.healthz_status(t(101)).node_eligible, Some(true));

        tracker.set_node_leaving(Some("the Node is being deleted".to_owned()));
        let healthz = tracker.healthz_status(t(102));
        assert!(!healthz.healthy);
        assert_eq!(healthz.reason.as_deref(), Some("the Node is being deleted"));
        assert_eq!(healthz.node_eligible, Some(false));
        let livez = tracker.status(t(102));
        assert!(livez.healthy && livez.node_eligible.is_none());

        // An unhealthy agent keeps its own reason first.
        tracker.record_sync_failure(t(103), "boom".to_owned());
        let healthz = tracker.healthz_status(t(104));
        assert!(healthz
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("boom")));
        assert_eq!(healthz.node_eligible, Some(false));

        tracker.set_node_leaving(None);
        tracker.record_sync_success(t(105));
        assert!(tracker.healthz_status(t(106)).healthy);
    }
}
