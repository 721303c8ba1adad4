//! The file source for `topoproxy run --source DIR`: the directory is loaded, then watched,
//! and every change to it is sent to the sync loop as the object-level events it amounts to.
//!
//! The directory is watched with inotify (the `notify` crate): a file closed after writing,
//! created, removed or renamed triggers a scan at once. The scan also runs every `interval`,
//! as the fallback where inotify is unavailable (the watch could not be set up, a network
//! file system) or lost events (queue overflow). A scan stats every file and reads and
//! parses only those that changed ([`DirectoryCache`]), so it is cheap at 10,000 files; the
//! merged view is then updated, and events sent, only for the objects those files defined
//! before or define now, so one changed file costs what its objects do, not the directory.
//!
//! A reload that fails (a half-written file, a YAML error) keeps the last good state and says
//! so; the next change is tried again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

use super::dir_cache::{Changed, DirectoryCache, Scan, ScanCounts};
use super::{Resource, SourceEvent};
use crate::state::AgentState;
use crate::store::{SliceKey, Store};

/// The `resource` label of `topoproxy_watch_errors_total` for a directory that cannot be
/// read or loaded.
pub const DIRECTORY_RESOURCE: &str = "directory";

/// Loads `dir`, sends it, and keeps sending its changes, on inotify events and every
/// `interval`, until the sync loop goes away.
pub async fn run(
    dir: PathBuf,
    node_name: String,
    interval: Duration,
    events: mpsc::Sender<SourceEvent>,
    state: Arc<AgentState>,
) {
    let (touched_tx, mut touched) = mpsc::channel(1);
    // Dropping the watcher ends the watch: it lives as long as this loop.
    let _watcher = match watch(&dir, touched_tx) {
        Ok(watcher) => Some(watcher),
        Err(error) => {
            tracing::warn!(
                %error,
                dir = %dir.display(),
                ?interval,
                "cannot watch the source directory with inotify; polling it"
            );
            None
        }
    };
    let mut cache = DirectoryCache::new();
    let mut listed = false;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            Some(()) = touched.recv() => {}
        }
        let scanning = Instant::now();
        let (changed, counts) = match cache.scan(&dir) {
            Ok((Scan::Changed(changed), counts)) => (changed, counts),
            Ok((Scan::Unchanged, _)) => continue,
            Err(error) => {
                tracing::warn!(%error, "cannot load the source directory; keeping the last state");
                state.metrics.watch_error(DIRECTORY_RESOURCE);
                continue;
            }
        };
        for warning in cache.warnings() {
            tracing::warn!("{warning}");
            state.metrics.skipped_objects(warning.object.kind, 1);
        }
        let collecting = Instant::now();
        let changes = events_for(&changed, cache.store(), &node_name);
        let sending = Instant::now();
        let sent = changes.len();
        for event in changes {
            if events.send(event).await.is_err() {
                return;
            }
        }
        log_reload(
            counts,
            sent,
            [
                ("scan", collecting - scanning),
                ("events", sending - collecting),
                ("send", sending.elapsed()),
            ],
        );
        if !listed {
            listed = true;
            // One load covers every kind a directory can hold.
            for resource in [
                Resource::Services,
                Resource::EndpointSlices,
                Resource::ServiceImports,
                Resource::ImportedSlices,
            ] {
                if events.send(SourceEvent::Listed(resource)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// A reload slower than this is logged at info, with its phases (under emulation, where
/// `cargo xtask vm-bench` reads them, most are).
const SLOW_RELOAD: Duration = Duration::from_millis(100);

/// Logs a reload's files, events and phases: at info when it was slow.
fn log_reload(counts: ScanCounts, events: usize, phases: [(&str, Duration); 3]) {
    let total: Duration = phases.iter().map(|(_, lap)| *lap).sum();
    let took = format!("{:.3}s", total.as_secs_f64());
    let phases = phases
        .iter()
        .map(|(name, lap)| format!("{name}={:.3}s", lap.as_secs_f64()))
        .collect::<Vec<_>>()
        .join(" ");
    if total >= SLOW_RELOAD {
        tracing::info!(
            read = counts.read,
            parsed = counts.parsed,
            events,
            took,
            phases,
            "slow source reload"
        );
    } else {
        tracing::debug!(
            read = counts.read,
            parsed = counts.parsed,
            events,
            took,
            phases,
            "source directory changed"
        );
    }
}

/// Watches `path` (a directory, recursively; or a single file, through its parent) and
/// signals `touched` when something in it may have changed. Many events between two scans
/// make one signal.
fn watch(path: &Path, touched: mpsc::Sender<()>) -> notify::Result<RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // An error (such as a queue overflow) may hide a change: scan.
        if event.map_or(true, |event| may_change_content(&event.kind)) {
            let _ = touched.try_send(());
        }
    })?;
    if path.is_dir() {
        watcher.watch(path, RecursiveMode::Recursive)?;
    } else {
        let parent = path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        watcher.watch(parent, RecursiveMode::NonRecursive)?;
    }
    Ok(watcher)
}

/// Whether an event may have changed what a scan reads. Writes in progress are left for the
/// close that ends them, so a scan does not read a half-written file on every `write(2)`;
/// reads are ignored.
fn may_change_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Modify(ModifyKind::Data(_)) => false,
        _ => true,
    }
}

/// The events that carry what a scan `changed` in the merged view `store` to the sync loop,
/// for the node `node_name`: each changed object as it now is, or its removal; another
/// Node only by its locality, as the API source's metadata watch reports it.
pub fn events_for(changed: &Changed, store: &Store, node_name: &str) -> Vec<SourceEvent> {
    let mut events = Vec::new();
    for key in &changed.services {
        events.push(SourceEvent::Service(
            key.clone(),
            store.service(key).cloned(),
        ));
    }
    for key in &changed.slices {
        events.push(SourceEvent::Slice(key.clone(), store.slice(key).cloned()));
    }
    for name in &changed.localities {
        let locality = store
            .node(name)
            .map(|_| store.node_locality(name).cloned().unwrap_or_default());
        events.push(SourceEvent::NodeLocality(name.clone(), locality));
    }
    if changed.nodes.iter().any(|name| name == node_name) {
        events.push(SourceEvent::Node(store.node(node_name).cloned()));
    }
    events
}

/// The events that turn `before` into `after` for the node `node_name`.
pub fn changes(before: &Store, after: &Store, node_name: &str) -> Vec<SourceEvent> {
    let mut events = Vec::new();
    for service in before.services() {
        if after.service(&service.key).is_none() {
            events.push(SourceEvent::Service(service.key.clone(), None));
        }
    }
    for service in after.services() {
        if before.service(&service.key) != Some(service) {
            events.push(SourceEvent::Service(
                service.key.clone(),
                Some(service.clone()),
            ));
        }
    }
    let slices = |store: &Store| -> BTreeMap<SliceKey, crate::model::EndpointSlice> {
        store
            .slices()
            .map(|slice| (SliceKey::of(slice), slice.clone()))
            .collect()
    };
    let (old_slices, new_slices) = (slices(before), slices(after));
    for key in old_slices.keys() {
        if !new_slices.contains_key(key) {
            events.push(SourceEvent::Slice(key.clone(), None));
        }
    }
    for (key, slice) in new_slices {
        if old_slices.get(&key) != Some(&slice) {
            events.push(SourceEvent::Slice(key, Some(slice)));
        }
    }
    // Every Node's locality (the API source gets these from a metadata-only watch).
    for node in before.nodes() {
        if after.node(&node.name).is_none() {
            events.push(SourceEvent::NodeLocality(node.name.clone(), None));
        }
    }
    for node in after.nodes() {
        let locality = after.node_locality(&node.name);
        if before.node_locality(&node.name) != locality {
            events.push(SourceEvent::NodeLocality(
                node.name.clone(),
                Some(locality.cloned().unwrap_or_default()),
            ));
        }
    }
    match (before.node(node_name), after.node(node_name)) {
        (old, Some(new)) if old != Some(new) => events.push(SourceEvent::Node(Some(new.clone()))),
        (Some(_), None) => events.push(SourceEvent::Node(None)),
        _ => {}
    }
    events
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::sync::RwLock;

    use super::*;
    use crate::health::HealthTracker;
    use crate::metrics::Metrics;
    use crate::source::test_dir::{service, Scratch};
    use crate::table::NodeTable;

    struct Running {
        events: mpsc::Receiver<SourceEvent>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    fn start(dir: &Scratch, interval: Duration) -> Running {
        let (tx, events) = mpsc::channel(64);
        let state = Arc::new(AgentState {
            node_name: "node-a".to_owned(),
            metrics: Metrics::new(),
            health: HealthTracker::new(Duration::from_secs(60)),
            table: RwLock::new(NodeTable::new()),
        });
        let task = tokio::spawn(run(
            dir.path().to_path_buf(),
            "node-a".to_owned(),
            interval,
            tx,
            state,
        ));
        Running { events, task }
    }

    /// Waits (bounded) for the Service `prod/web` to be sent with `ip` as its cluster IP.
    async fn wait_for_web(running: &mut Running, ip: &str) {
        let want: IpAddr = ip.parse().unwrap();
        let wait = async {
            while let Some(event) = running.events.recv().await {
                if let SourceEvent::Service(_, Some(service)) = event {
                    if service.cluster_ips.first() == Some(&want) {
                        return;
                    }
                }
            }
            panic!("the source stopped");
        };
        tokio::time::timeout(Duration::from_secs(20), wait)
            .await
            .unwrap_or_else(|_| panic!("prod/web with cluster IP {ip} never came"));
    }

    // Fails on a poll that fingerprints (path, size, mtime) and so never reads the rewrite.
    #[tokio::test]
    async fn a_same_size_rewrite_keeping_the_mtime_is_seen() {
        let dir = Scratch::new("poll");
        dir.write("web.yaml", &service("web", "10.0.0.1"));
        let mut running = start(&dir, Duration::from_millis(20));
        wait_for_web(&mut running, "10.0.0.1").await;
        dir.rewrite_keeping_mtime("web.yaml", &service("web", "10.0.0.2"));
        wait_for_web(&mut running, "10.0.0.2").await;
    }

    // The poll is an hour away: only inotify can bring the change.
    #[tokio::test]
    async fn a_change_arrives_by_inotify_before_the_next_poll() {
        let dir = Scratch::new("poll");
        dir.write("web.yaml", &service("web", "10.0.0.1"));
        let mut running = start(&dir, Duration::from_secs(3600));
        wait_for_web(&mut running, "10.0.0.1").await;
        dir.write("web.yaml", &service("web", "10.0.0.22"));
        wait_for_web(&mut running, "10.0.0.22").await;
    }
}
